"""A backbone registered by a user's module (the README's examples/my_models.py) trains, exports and is served by
three real tier processes that import the module themselves; without it, a tier says what is missing."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from common.plugins import PLUGINS_ENV, use_plugins
from tests.conftest import ROOT

PLUGIN = "examples.my_models"


@pytest.fixture(scope="module")
def plugin_bundle(tmp_path_factory):
    from training.config import TrainConfig
    from training.export import export
    from training.train import train

    out = tmp_path_factory.mktemp("plugin-run")
    with pytest.MonkeyPatch.context() as mp:  # the plugin list and search path go back to how they were
        mp.setenv(PLUGINS_ENV, "")
        mp.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
        cfg = TrainConfig(architecture="mynet", plugin=[PLUGIN], width=0.25, epochs=1, max_batches=4,
                          limit_train=512, limit_val=200, batch_size=64, epochs_gates=2)
        assert cfg.exit_points == [2, 3]  # the entry's own defaults
        assert os.environ[PLUGINS_ENV] == PLUGIN
        train(cfg, out)
        export(out / "checkpoint.safetensors", out / "bundle")
        env = dict(os.environ)
    return out / "bundle", env


@pytest.mark.e2e
def test_tiers_import_the_plugin_given_to_the_launcher(plugin_bundle, test_slice):
    from device.client import run_client
    from common.emulation.deployment import LocalDeployment

    bundle, env = plugin_bundle
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(PLUGINS_ENV, env[PLUGINS_ENV])  # what `--plugin` leaves for the tier processes
        with LocalDeployment(bundle, startup_timeout_s=60) as dep:
            report = run_client(dep.device_address, test_slice.images[:64], test_slice.labels[:64], 32, bundle)
    assert report["samples"] == 64 and report["prediction_mismatches"] == 0


def test_a_tier_without_the_plugin_names_the_flag(plugin_bundle):
    bundle, _ = plugin_bundle
    env = {k: v for k, v in os.environ.items() if k != PLUGINS_ENV}
    result = subprocess.run([sys.executable, "-m", "cloud", "--bundle", str(bundle / "cloud"), "--listen",
                             "127.0.0.1:0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown backbone 'mynet'" in result.stderr and "--plugin" in result.stderr


def test_plugin_modules_are_checked_and_passed_on(tmp_path, monkeypatch):
    from common.errors import ConfigError

    monkeypatch.setenv(PLUGINS_ENV, "")
    monkeypatch.setenv("PYTHONPATH", "")
    (tmp_path / "splitexit_test_plugin_xyz.py").write_text("LOADED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    use_plugins(["splitexit_test_plugin_xyz"])
    assert os.environ[PLUGINS_ENV] == "splitexit_test_plugin_xyz"
    assert str(tmp_path) in os.environ["PYTHONPATH"].split(os.pathsep)  # children started elsewhere find it
    with pytest.raises(ConfigError, match="cannot import plugin module 'no_such_plugin'"):
        use_plugins(["no_such_plugin"])
