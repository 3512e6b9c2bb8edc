import json

import pytest
import torch

from common.model.gates import gate_from_dict
from training import checkpoint
from training.calibrate import cascade
from training.config import TrainConfig
from training.engine import augment_crop_flip, collect_logits
from training.evaluate import evaluate_in_process
from training.train import train


def test_joint_run_writes_a_calibrated_checkpoint(tiny_run):
    model, meta = checkpoint.load(tiny_run)
    assert len(meta["gates"]) == 2 and meta["class_names"][0] == "class0"
    assert meta["policy"] == "confidence" and meta["gates"] == meta["policies"]["confidence"]
    assert set(meta["policies"]) == {"confidence", "entropy", "margin", "mlp", "cost", "ensemble"}
    for name, cal in meta["calibration"].items():
        # Ordered on the training split; certified on all of validation, or the half the fitted gates never saw.
        certified_on = 200 if name in ("mlp", "cost", "ensemble") else 400
        assert cal["val_samples"] == certified_on and sum(cal["val_exit_counts"]) == certified_on, name
        assert cal["ordered_on"] == "train" and cal["path_samples"] == 25 * 128, name
        assert 0 < cal["val_flops_fraction"] < 1.1
    assert json.loads((tiny_run.parent / "config.json").read_text())["width"] == 0.125
    history = json.loads((tiny_run.parent / "history.json").read_text())
    assert history[0]["samples"] == 25 * 128
    assert history[0]["loss"] > 0


def test_staged_mode_trains_exits_on_a_frozen_backbone(tmp_path):
    cfg = TrainConfig(width=0.125, exit_conv_channels=8, mode="staged", epochs_backbone=1, epochs_exits=1,
                      max_batches=3, limit_train=512, limit_val=128, batch_size=64)
    train(cfg, tmp_path / "staged")
    history = json.loads((tmp_path / "staged" / "history.json").read_text())
    assert [h["stage"] for h in history] == ["backbone", "exits"]

    # Re-run stage 2 by hand from the stage-1 state: the backbone (BatchNorm statistics included) must not move.
    from training.train import _fit, build_model
    from common.data.datasets import load

    data = load("synthetic", "train", limit=256)
    model = build_model(cfg, 10, (3, 32, 32))
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    _fit(model, list(model.exits.parameters()), [1.0, 1.0, 0.0], 1, data, data.subset(torch.arange(64)), cfg,
         torch.Generator().manual_seed(0), "exits", freeze_backbone=True)
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(a, b) for a, b in zip(model.exits.state_dict().values(),
                                                      build_model(cfg, 10, (3, 32, 32)).exits.state_dict().values()))


def test_in_process_chain_matches_the_whole_model_cascade(tiny_run, tiny_bundle, test_slice):
    """Really exiting (smaller batches downstream) gives the same answers as gating the whole model's outputs."""
    model, meta = checkpoint.load(tiny_run)
    logits = collect_logits(model, test_slice)
    gates = [gate_from_dict(g) for g in meta["gates"]]
    sim = cascade(logits, test_slice.labels, gates)
    report, _ = evaluate_in_process(tiny_bundle, test_slice.images, test_slice.labels, batch_size=64)
    assert report["accuracy"] == sim["accuracy"]
    assert [report["exits"][t] for t in ("device", "edge", "cloud")] == sim["exit_counts"]


def test_crop_flip_augmentation_is_a_padded_crop_possibly_flipped():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (16, 3, 8, 8), dtype=torch.uint8)  # no zeros, so padding is recognisable
    y = augment_crop_flip(x, g, pad=2)
    assert y.shape == x.shape and y.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    kinds = set()
    for i in range(len(x)):
        matches = [(dy, dx, flip) for dy in range(5) for dx in range(5) for flip in (False, True)
                   if torch.equal(y[i], (lambda c: c.flip(-1) if flip else c)(padded[i, :, dy:dy + 8, dx:dx + 8]))]
        assert matches, f"sample {i} is not a crop of its padded image"
        kinds.add(matches[0][2])
    assert kinds == {False, True}  # both flipped and unflipped samples occur
    assert not torch.equal(x, y)


def test_uncalibrated_checkpoint_is_refused_until_calibrated(tiny_run, tmp_path):
    from common.errors import ConfigError
    from training import calibrate
    from training.export import export

    model, meta = checkpoint.load(tiny_run)
    path = tmp_path / "interrupted.safetensors"
    checkpoint.save(model, {**meta, "gates": None, "progress": {"stage": "joint", "epoch": 1}}, path)
    with pytest.raises(ConfigError, match="not calibrated"):
        export(path, tmp_path / "bundle")
    # An accuracy target ten points under the final exit's: certifiable whatever accuracy this host's run reached.
    target = round(meta["calibration"]["entropy"]["final_accuracy"] - 0.1, 2)
    assert calibrate.main(["--checkpoint", str(path), "--target-accuracy", str(target), "--policy", "entropy"]) == 0
    _, meta2 = checkpoint.load(path)
    assert meta2["policy"] == "entropy" and meta2["calibration"]["entropy"]["target"] == target
    assert all(g["kind"] in ("entropy", "never") for g in meta2["gates"])
    # The learned gates were kept: only thresholds are re-calibrated.
    assert [g["weights"] for g in meta2["policies"]["mlp"]] == [g["weights"] for g in meta["policies"]["mlp"]]
    assert len(export(path, tmp_path / "bundle")) == 3


def test_self_distillation_loss():
    import torch.nn.functional as F

    from training.engine import weighted_exit_loss

    torch.manual_seed(0)
    labels = torch.randint(0, 4, (8,))
    final = torch.randn(8, 4, requires_grad=True)
    early = torch.randn(8, 4, requires_grad=True)
    plain = weighted_exit_loss([early, final], labels, [0.5, 1.0])
    assert plain.item() == pytest.approx(0.5 * F.cross_entropy(early, labels).item()
                                         + F.cross_entropy(final, labels).item(), rel=1e-6)
    # An early exit that already matches the final exit's outputs has zero distillation term.
    copy = final.detach().clone().requires_grad_(True)
    distilled = weighted_exit_loss([copy, final], labels, [0.5, 1.0], distill=3.0)
    expected = 0.5 * 0.5 * F.cross_entropy(copy, labels) + F.cross_entropy(final, labels)
    assert distilled.item() == pytest.approx(expected.item(), abs=1e-5)
    # The teacher is fixed: the distillation term sends no gradient into the final exit.
    weighted_exit_loss([early, final], labels, [1.0, 0.0], distill=2.0).backward()
    assert final.grad is None and early.grad is not None


def test_distilled_training_runs(tmp_path):
    cfg = TrainConfig(width=0.125, epochs=1, max_batches=3, limit_train=384, limit_val=128, batch_size=64,
                      distill=4.0, epochs_gates=2)
    meta = train(cfg, tmp_path / "d")
    assert meta["config"]["distill"] == 4.0 and len(meta["gates"]) == 2


def test_seed_smoke_command_with_both_policies(tmp_path, capsys):
    """The seed's smoke run: no backbone epochs, one exit epoch, one gate epoch of 50 batches, both policies."""
    from training.train import main

    assert main(["--out", str(tmp_path), "--mode", "staged", "--epochs-backbone", "0", "--epochs-exits", "1",
                 "--epochs-gates", "1", "--gate-max-batches", "50", "--policy", "both", "--width", "0.125",
                 "--limit-train", "512", "--limit-val", "400", "--max-batches", "4"]) == 0
    out = capsys.readouterr().out
    static = [line for line in out.splitlines() if "confidence: validation accuracy" in line]
    learned = [line for line in out.splitlines() if "mlp: validation accuracy" in line]
    assert len(static) == 1 and len(learned) == 1 and learned[0].endswith("<- active")
    assert "entropy: validation" not in out  # both = the static threshold and the learned gate, side by side
    _, meta = checkpoint.load(tmp_path / "checkpoint.safetensors")
    assert meta["policy"] == "mlp" and meta["gates"] == meta["policies"]["mlp"]
