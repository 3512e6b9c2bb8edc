import argparse

import pytest

from common.config import add_config_args, resolve_config
from common.errors import ConfigError
from training.config import TrainConfig


def parse(argv):
    p = argparse.ArgumentParser()
    add_config_args(p, TrainConfig)
    return p.parse_args(argv)


def test_defaults_file_then_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('width = 0.5\nepochs = 7\nloss_weights = [1.0, 1.0, 2.0]\ndata = "cifar10:/x"\n')
    cfg = resolve_config(TrainConfig, f, parse(["--epochs", "2", "--no-download"]))
    assert cfg.width == 0.5 and cfg.epochs == 2 and cfg.loss_weights == [1.0, 1.0, 2.0]
    assert cfg.data == "cifar10:/x" and cfg.download is False
    assert resolve_config(TrainConfig, None, parse([])) == TrainConfig()


def test_list_flags_are_comma_separated():
    cfg = resolve_config(TrainConfig, None, parse(["--loss-weights", "0.2,0.3,1", "--exit-points", "1,3"]))
    assert cfg.loss_weights == [0.2, 0.3, 1.0] and cfg.exit_points == [1, 3]


@pytest.mark.parametrize("toml, message", [
    ("widht = 0.5", "unknown keys"),
    ("epochs = 'many'", "epochs"),
    ("epochs = 1.5", "integer"),
    ("mode = 'sideways'", "mode"),
    ("loss_weights = [1.0]", "loss_weights"),
    ("width = [", "not valid TOML"),
    ("exit_points = [2]", "exit_points"),
    ("policy = 'bogus'", "policy"),
    ("alpha = 2.0", "alpha"),
    ("target_drop = 1.0\nbudget_flops = 0.5", "at most one"),
    ("target_accuracy = 1.5", "target_accuracy"),
    ("loss_weights = [0.0, 0.0, 1.0]", "loss_weights"),
    ("exit_conv_layers = 0", "conv_layers >= 1"),
])
def test_bad_files_are_config_errors(tmp_path, toml, message):
    f = tmp_path / "c.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        resolve_config(TrainConfig, f, None)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config(TrainConfig, "/nonexistent.toml", None)
