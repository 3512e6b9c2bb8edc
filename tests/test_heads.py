"""Exit heads refitted on a frozen backbone from cached features (training.heads)."""
import torch

from common.data.datasets import load
from common.errors import ConfigError
from training import checkpoint
from training.config import TrainConfig
from training.engine import augment_crop_flip, collect_logits, evaluate
from training.calibrate import main as calibrate_main
from training.heads import cache_features, feature_bytes, main, refit_heads, with_new_heads


def _non_head_state(model):
    return {k: v for k, v in model.state_dict().items() if not k.startswith("exits.")}


def test_cached_features_are_what_the_heads_read(tiny_model):
    data = load("synthetic", "train", limit=96)
    gen, again = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    cached = cache_features(tiny_model, data, views=2, generator=gen, augment=True, batch_size=40)
    assert len(cached) == 192 and torch.equal(cached.labels, data.labels.repeat(2))
    with torch.no_grad():
        plain, final = tiny_model.exit_features(data.images)
        shifted = torch.cat([augment_crop_flip(data.images[i:i + 40], again) for i in range(0, 96, 40)])
        moved, _ = tiny_model.exit_features(shifted)
    for got, first, second in zip(cached.features, plain, moved):
        assert got.dtype == torch.float16
        assert torch.allclose(got[:96].float(), first, atol=1e-2, rtol=1e-2)
        assert torch.allclose(got[96:].float(), second, atol=1e-2, rtol=1e-2)
    assert torch.allclose(cached.teacher[:96], final)
    assert feature_bytes(tiny_model, 192) == sum(f.numel() * 2 for f in cached.features) + cached.teacher.numel() * 4


def test_new_heads_keep_the_backbone_and_can_change_kind(tiny_model):
    from common.model import ExitHeadSpec

    fresh = with_new_heads(tiny_model, ExitHeadSpec(conv_channels=4, conv_stride=2))
    assert fresh.spec.exit_head.conv_channels == 4
    old, new = _non_head_state(tiny_model), _non_head_state(fresh)
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(fresh(images)[-1], tiny_model(images)[-1])


def test_refit_trains_the_heads_and_leaves_the_rest_exactly_as_it_was(tiny_run, test_slice):
    model, meta = checkpoint.load(tiny_run)
    cfg = TrainConfig(**{**meta["config"], "limit_train": 1024})
    train_set = load(cfg.data, "train", val_fraction=cfg.val_fraction, seed=cfg.seed, limit=1024)
    untrained = with_new_heads(model)
    lines = []
    refit, history = refit_heads(model, train_set, cfg, epochs=3, views=2, log=lines.append)
    assert [h["epoch"] for h in history] == [1, 2, 3] and history[-1]["loss"] < history[0]["loss"]
    assert any("GiB" in line for line in lines)
    old, new = _non_head_state(model), _non_head_state(refit)
    assert all(torch.equal(old[k], new[k]) for k in old)  # BatchNorm statistics included
    before, after = collect_logits(model, test_slice), collect_logits(refit, test_slice)
    assert torch.equal(before[-1], after[-1])
    fresh_acc = evaluate(untrained, test_slice)["exit_accuracy"]
    refit_acc = evaluate(refit, test_slice)["exit_accuracy"]
    assert all(r > f + 0.1 for r, f in zip(refit_acc[:-1], fresh_acc[:-1])), (refit_acc, fresh_acc)


def test_command_writes_a_calibrated_checkpoint_with_the_new_heads(tiny_run, tmp_path, capsys):
    from training.export import export

    out = tmp_path / "refit.safetensors"
    assert main(["--checkpoint", str(tiny_run), "--out", str(out), "--epochs", "1",
                 "--exit-conv-channels", "4", "--exit-conv-layers", "2"]) == 0
    model, meta = checkpoint.load(out)
    assert model.spec.exit_head.conv_channels == 4 and meta["config"]["exit_conv_channels"] == 4
    assert model.spec.exit_head.conv_layers == 2 and meta["config"]["exit_conv_layers"] == 2
    assert meta["heads"]["epochs"] == 1 and set(meta["policies"]) >= {"confidence", "ensemble"}
    assert meta["calibration"]["confidence"]["ordered_on"] == "train"  # by default, on the training split
    assert "validation exit accuracy" in capsys.readouterr().out
    export(out, tmp_path / "bundle")  # a refitted checkpoint deploys like any other
    assert (tmp_path / "heads-history.json").is_file()
    # ... re-calibrates like any other, and refits again
    assert calibrate_main(["--checkpoint", str(out), "--target-drop", "2", "--order-on", "val"]) == 0
    calibration = checkpoint.load(out)[1]["calibration"]["confidence"]
    assert calibration["target"] == 2 and calibration["ordered_on"] == "val"
    assert main(["--checkpoint", str(out), "--out", str(tmp_path / "again.safetensors"), "--epochs", "1"]) == 0
    # A checkpoint refitted by an older version kept its refit record in the config: still re-calibrated.
    model, meta = checkpoint.load(out)
    meta["config"].update(heads_epochs=6, heads_views=2)
    checkpoint.save(model, meta, out)
    assert calibrate_main(["--checkpoint", str(out), "--target-drop", "2", "--order-on", "val"]) == 0


def test_command_refuses_bad_values_in_one_line(tiny_run, tmp_path):
    import pytest

    with pytest.raises(ConfigError, match="--exit-conv-channels must be >= 0"):
        main(["--checkpoint", str(tiny_run), "--out", str(tmp_path / "x.safetensors"), "--exit-conv-channels", "-2"])
    with pytest.raises(ConfigError, match="cannot refit heads"):
        main(["--checkpoint", str(tiny_run), "--out", str(tmp_path / "x.safetensors"), "--lr", "-1"])


def test_ablation_compares_variants_on_one_cache(tiny_run, tmp_path):
    import json

    import pytest

    from training.analysis.heads_ablation import main as ablation

    assert ablation(["--checkpoint", str(tiny_run), "--out", str(tmp_path), "--epochs", "1", "--splits", "3",
                     "--variants", "joint,refit,pool_linear,no_cascade"]) == 0
    result = json.loads((tmp_path / "heads_ablation.json").read_text())
    assert (tmp_path / "heads_ablation.png").stat().st_size > 0
    variants = result["variants"]
    assert list(variants) == ["joint", "refit", "pool_linear", "no_cascade"]
    assert variants["joint"]["fit_seconds"] is None and variants["refit"]["fit_seconds"] > 0
    # Same backbone and final exit everywhere; a head without its conv is cheaper to leave at.
    assert len({v["exit_accuracy"][-1] for v in variants.values()}) == 1
    # ``refit`` is exactly what training.heads writes (same cache, same draws).
    model, meta = checkpoint.load(tiny_run)
    cfg = TrainConfig(**meta["config"])
    train_set = load(cfg.data, "train", val_fraction=cfg.val_fraction, seed=cfg.seed, limit=cfg.limit_train)
    val = load(cfg.data, "val", val_fraction=cfg.val_fraction, seed=cfg.seed, limit=cfg.limit_val)
    refit, _ = refit_heads(model, train_set, cfg, epochs=1, views=2, log=lambda _: None)
    assert evaluate(refit, val)["exit_accuracy"] == pytest.approx(variants["refit"]["exit_accuracy"], abs=1e-6)
    assert variants["pool_linear"]["exit_cost_fraction"][0] < variants["refit"]["exit_cost_fraction"][0]
    for v in variants.values():
        for policy in ("confidence", "margin"):
            certified = v["certified"][policy]
            assert len(certified["flops_fraction"]) == 3 and certified["std_flops_fraction"] >= 0
            assert 0 < min(certified["flops_fraction"]) <= certified["mean_flops_fraction"]
            assert certified["mean_flops_fraction"] <= max(v["exit_cost_fraction"])


def test_ablation_refuses_unknown_variants_in_one_line(tiny_run, tmp_path, capsys):
    import pytest

    from training.analysis.heads_ablation import main as ablation

    with pytest.raises(SystemExit):
        ablation(["--checkpoint", str(tiny_run), "--out", str(tmp_path), "--variants", "wider"])
    assert "unknown variant(s) ['wider']" in capsys.readouterr().err
