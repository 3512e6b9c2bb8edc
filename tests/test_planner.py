"""The split planner: choices on cases whose best answer is known, and an export that serves what was predicted."""
import json

import pytest

from common.wire.link import LinkModel
from common.emulation.chain import evaluate_in_process
from training import checkpoint
from common.data.datasets import load
from training.analysis.planner import Settings, exit_splits, plan
from scripts.plan import export_choice, main as plan_main


@pytest.fixture(scope="module")
def planned(tiny_run):
    model, meta = checkpoint.load(tiny_run)
    val = load("synthetic", "val", limit=400)
    test = load("synthetic:test", "test", limit=192)
    return model, meta, val, test


def settings(**kw) -> Settings:
    base = dict(target_drop=5.0, codecs=("float32", "int8"), compressions=("",), reps=1, batch_size=64)
    return Settings(**{**base, **kw})


def test_a_two_exit_model_has_one_split(planned):
    model, *_ = planned
    assert exit_splits(model) == [(0, 1)]


@pytest.fixture(scope="module")
def slow_link_plan(planned):
    model, meta, val, test = planned
    return plan(model, meta, val, test, settings(link=LinkModel(20e3, 0.0)), log=lambda *_: None)


def test_slow_link_keeps_everything_on_the_device(slow_link_plan):
    rows = slow_link_plan["candidates"]
    assert rows[0].kind == "device_only"  # nothing crosses a 20 kbit/s link faster than computing locally
    best = rows[slow_link_plan["chosen"]]
    splits = [r for r in rows if r.kind == "split" and r.feasible]
    sent = {r.name: sum(r.predicted["bytes_per_sample"].values()) for r in splits}
    assert sent[best.name] == min(sent.values())  # when bytes dominate, the fastest split sends the fewest
    assert [str(w) for w in best.codecs] == ["int8", "int8"] and best.early_exits


@pytest.mark.e2e
def test_served_export_uses_the_chosen_codecs(slow_link_plan, planned, tmp_path):
    """Three tier processes started on the exported bundles without --codec send int8, as planned: the bytes on
    each link are the predicted ones and the answers those of the in-process chain."""
    from device.client import run_client
    from common.emulation.deployment import LocalDeployment

    model, meta, _, test = planned
    best = slow_link_plan["candidates"][slow_link_plan["chosen"]]
    export_choice(model, meta, best, tmp_path / "bundle", "confidence", {})
    with LocalDeployment(tmp_path / "bundle", startup_timeout_s=60) as dep:
        report = run_client(dep.device_address, test.images, test.labels, 64, tmp_path / "bundle")
    assert report["prediction_mismatches"] == 0
    for link, predicted in best.predicted["bytes_per_sample"].items():
        assert report["bytes_per_sample"][link] == pytest.approx(predicted, rel=0.02)


def test_fast_link_and_slow_device_offload_the_image(planned):
    model, meta, val, test = planned
    result = plan(model, meta, val, test, settings(link=LinkModel(1e11, 0.0), scales=(1000.0, 1.0, 1.0)),
                  log=lambda *_: None)
    assert result["candidates"][0].kind == "cloud_offload"


def test_exported_choice_serves_the_predicted_answers(planned, tmp_path):
    """With element-wise codecs the served cascade is exactly the cached one: same accuracy, same exits."""
    model, meta, val, test = planned
    result = plan(model, meta, val, test, settings(codecs=("float32", "float16")), log=lambda *_: None)
    best = result["candidates"][result["chosen"]]
    export_choice(model, meta, best, tmp_path / "bundle", "confidence", {})
    manifest = json.loads((tmp_path / "bundle" / "device" / "manifest.json").read_text())
    assert manifest["link"]["codec"] == best.codecs[0].name
    report, _ = evaluate_in_process(tmp_path / "bundle", test.images, test.labels, 64)
    assert report["accuracy"] == pytest.approx(best.predicted["accuracy"])
    assert list(report["exits"].values()) == best.predicted["exits"]


def test_command_line_writes_a_ranked_plan(tiny_run, tmp_path, capsys):
    assert plan_main(["--checkpoint", str(tiny_run), "--data", "synthetic:test", "--limit", "128",
                      "--target-drop", "5", "--codecs", "float32", "--compressions", "none", "--reps", "1",
                      "--link", "10mbit,5ms", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "plan.json").read_text())
    lat = [c["predicted"]["latency_ms_mean"] for c in doc["candidates"] if c["feasible"]]
    assert lat == sorted(lat) and doc["settings"]["link"] == "10mbit,5ms"
    assert "chosen:" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--link", "fast"], "bad link"),
    (["--profile", "phone=2"], "bad compute profile"),
    (["--compressions", "lz4"], "--compressions"),
    (["--codecs", "int4"], "unknown codec"),
])
def test_bad_values_stop_with_one_line(tiny_run, argv, message, capsys):
    with pytest.raises(SystemExit):
        from common.cli import run
        run(plan_main, ["--checkpoint", str(tiny_run)] + argv)
    assert message in capsys.readouterr().err


def test_more_exits_than_tiers_let_the_planner_choose(tmp_path):
    """A model trained with three early exits: training.export spreads them over device and edge by default, the
    planner ranks every split of them, and its export serves exactly what it predicted (float32 links)."""
    from training.config import TrainConfig
    from training.export import export
    from training.train import train

    cfg = TrainConfig(width=0.125, exit_conv_channels=8, epochs=1, max_batches=10, limit_train=1280, limit_val=400,
                      batch_size=128, target_drop=5.0, exit_points=[1, 2, 3], loss_weights=[0.3, 0.3, 0.3, 1.0],
                      epochs_gates=5)
    train(cfg, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoint.safetensors"
    default = [json.loads((f / "manifest.json").read_text()) for f in export(ckpt, tmp_path / "default")]
    assert [[e["index"] for e in m["segment"]["exits"]] for m in default] == [[0, 1], [2], [3]]
    model, meta = checkpoint.load(ckpt)
    assert exit_splits(model) == [(0, 1), (0, 2), (1, 2)]
    val, test = load("synthetic", "val", limit=400), load("synthetic:test", "test", limit=128)
    result = plan(model, meta, val, test, settings(codecs=("float32",)), log=lambda *_: None)
    assert {r.split for r in result["candidates"] if r.kind == "split"} == {(0, 1), (0, 2), (1, 2)}
    best = result["candidates"][result["chosen"]]
    export_choice(model, meta, best, tmp_path / "bundle", "confidence", {})
    manifest = json.loads((tmp_path / "bundle" / "edge" / "manifest.json").read_text())
    assert manifest["segment"]["split"] == list(best.split)
    report, _ = evaluate_in_process(tmp_path / "bundle", test.images, test.labels, 64)
    assert report["accuracy"] == pytest.approx(best.predicted["accuracy"])
    by_index = report["exits_by_index"]
    assert [by_index.get(str(e), {"samples": 0})["samples"] for e in range(4)] == best.predicted["exits"]
