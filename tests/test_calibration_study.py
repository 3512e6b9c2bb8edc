"""The calibration study command, and the calibration record that travels from checkpoint to bundle."""
import json

import pytest

from common.model.bundle import load_tier_bundle
from common.errors import ConfigError
from training import calibrate, checkpoint
from training.analysis import calibration_study
from training.export import export


def test_study_cli_writes_json_and_plot(tiny_bundle, tmp_path):
    out = tmp_path / "study"
    assert calibration_study.main(["--bundle", str(tiny_bundle), "--data", "synthetic:test", "--limit", "400",
                                   "--splits", "4", "--target-drop", "5", "--out", str(out)]) == 0
    result = json.loads((out / "calibration_study.json").read_text())
    assert (out / "calibration_study.png").stat().st_size > 0
    assert result["samples"] == 400 and result["splits"] == 4 and result["delta"] == 0.1
    assert (result["calibration_samples"], result["path_samples"], result["evaluation_samples"]) == (200, 100, 200)
    assert set(result["policies"]) == {"confidence", "entropy", "margin", "mlp", "cost", "ensemble"}
    for r in result["policies"].values():
        for method in ("naive", "ltt"):
            drops = r[method]["per_split"]["drop"]
            assert len(drops) == 4
            assert r[method]["held_fraction"] == pytest.approx(sum(d <= 5 + 1e-9 for d in drops) / 4)
        assert r["guarantee_flops_cost"] == pytest.approx(r["ltt"]["flops_fraction"]["mean"]
                                                          - r["naive"]["flops_fraction"]["mean"])


def test_study_refuses_impossible_splits(tiny_bundle, tmp_path):
    with pytest.raises(ConfigError, match="too few"):
        calibration_study.main(["--bundle", str(tiny_bundle), "--limit", "2", "--splits", "1", "--out",
                                str(tmp_path)])


def test_bundles_record_how_their_thresholds_were_calibrated(tiny_run, tmp_path):
    bundles = [load_tier_bundle(f) for f in export(tiny_run, tmp_path / "ltt")]
    record = bundles[0].calibration()
    assert (record["method"], record["objective"], record["target"], record["delta"], record["bound"]) == (
        "ltt", "target_drop", 5.0, 0.1, "wsr")
    assert bundles[1].calibration("mlp")["method"] == "ltt"
    assert bundles[2].calibration() == {}  # the last tier has no threshold to calibrate

    # Re-calibrating naively is recorded as such, and the cost policy goes back to its alpha rule.
    path = tmp_path / "naive.safetensors"
    model, meta = checkpoint.load(tiny_run)
    checkpoint.save(model, meta, path)
    assert calibrate.main(["--checkpoint", str(path), "--method", "naive", "--target-drop", "2"]) == 0
    _, meta2 = checkpoint.load(path)
    assert meta2["calibration"]["confidence"]["method"] == "naive"
    assert meta2["calibration"]["cost"]["method"] == "alpha"
    assert meta2["config"]["calibration"] == "naive"
    bundles = [load_tier_bundle(f) for f in export(path, tmp_path / "naive")]
    assert bundles[0].calibration()["method"] == "naive"


def test_calibrate_fits_the_policies_an_older_checkpoint_lacks_and_refits_on_request(tiny_run, tmp_path):
    """A checkpoint from before the ensemble policy and the agreement feature (no ``ensemble``, five-feature mlp
    gates): calibrating fits the ensemble and keeps the stored mlp gates; ``--refit --gate-agreement`` fits the mlp
    gates again, over the agreement feature. Both export to bundles whose tiers load every stored policy."""
    from common.model.gates import EnsembleGate, needs_history
    from training.engine import collect_logits
    from training.policies import fit_mlp_gates, gate_split

    model, meta = checkpoint.load(tiny_run)
    old = dict(meta)
    old["policies"] = {k: v for k, v in meta["policies"].items() if k != "ensemble"}
    logits = [lg for lg in collect_logits(model, load_val(meta))]
    labels = load_val(meta).labels
    fit, _ = gate_split(len(labels), meta["config"]["seed"])
    plain = fit_mlp_gates([lg[fit] for lg in logits], labels[fit], epochs=2, use_agreement=False)
    old["policies"]["mlp"] = [{"kind": "mlp", **g.params()} for g in plain]
    old["config"] = {k: v for k, v in meta["config"].items() if k != "gate_agreement"}
    path = tmp_path / "old.safetensors"
    checkpoint.save(model, old, path)

    assert calibrate.main(["--checkpoint", str(path), "--target-drop", "5"]) == 0
    _, kept = checkpoint.load(path)
    assert "ensemble" in kept["policies"] and kept["calibration"]["ensemble"]["method"] == "ltt"
    assert [len(g["weights"]) for g in kept["policies"]["ensemble"]] == [1, 2]
    assert [g["weights"]["mean"] for g in kept["policies"]["mlp"]] == [g["weights"]["mean"]
                                                                        for g in old["policies"]["mlp"]]
    assert all("exit" not in g for g in kept["policies"]["mlp"])

    assert calibrate.main(["--checkpoint", str(path), "--target-drop", "5", "--refit", "--gate-agreement",
                           "--policy", "ensemble"]) == 0
    _, refit = checkpoint.load(path)
    assert [g["exit"] for g in refit["policies"]["mlp"]] == [0, 1]
    assert refit["policy"] == "ensemble" and refit["config"]["gate_agreement"] is True
    bundles = [load_tier_bundle(f) for f in export(path, tmp_path / "bundle")]
    assert isinstance(bundles[1].gates[0], EnsembleGate) and bundles[1].gates[0].exit == 1
    assert needs_history(bundles[0].policy_gates("mlp")[0]) and bundles[0].manifest.policy == "ensemble"
    assert all(b.manifest.history for b in bundles)  # the ensemble reads the device exit's logits on the edge


def load_val(meta):
    from common.data.datasets import load

    cfg = meta["config"]
    return load(cfg["data"], "val", val_fraction=cfg["val_fraction"], seed=cfg["seed"], limit=cfg["limit_val"])
