import json

import pytest
import torch

from training.export import export_bundles
from common.model.bundle import find_tier_folders, load_tier_bundle, read_manifest
from common.errors import ConfigError
from common.model.gates import ConfidenceGate, EntropyGate
from common.model.split import split_model

GATES = [ConfidenceGate(0.8), EntropyGate(0.3)]


@pytest.fixture
def exported(tiny_model, tmp_path):
    export_bundles(tiny_model, GATES, tmp_path, [f"c{i}" for i in range(10)])
    return tmp_path


def test_each_tier_reloads_to_the_same_function(tiny_model, exported):
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    h = x
    for segment, folder in zip(split_model(tiny_model), find_tier_folders(exported)):
        bundle = load_tier_bundle(folder)
        with torch.no_grad():
            want_h, want_logits = segment(h)
            got_h, got_logits = bundle.segment(h)
        assert torch.equal(want_h, got_h) and all(torch.equal(a, b) for a, b in zip(want_logits, got_logits, strict=True))
        h = want_h


def test_manifests(exported):
    typed = [read_manifest(f) for f in find_tier_folders(exported)]
    assert [m.is_last for m in typed] == [False, False, True]
    assert typed[1].input_shape == typed[0].output_shape and typed[0].input_dtype == "uint8"
    manifests = [m.raw for m in typed]
    assert [m["tier"] for m in manifests] == ["device", "edge", "cloud"]
    assert len({m["model_id"] for m in manifests}) == 1
    assert manifests[0]["input"] == {"shape": [3, 32, 32], "dtype": "uint8",
                                     "normalization": {"mean": [0.4914, 0.4822, 0.4465],
                                                       "std": [0.247, 0.2435, 0.2616]}}
    assert manifests[1]["input"]["shape"] == manifests[0]["output_shape"]
    assert manifests[0]["gates"] == [{"kind": "confidence", "threshold": 0.8}]
    assert manifests[1]["gates"] == [{"kind": "entropy", "threshold": 0.3}]
    assert manifests[2]["gates"] == [{"kind": "always"}] and typed[2].exit_head == "final"
    assert [m.exits for m in typed] == [(0,), (1,), (2,)] and all(m.split == (0, 1) for m in typed)
    # The backbone's FLOPs are split across the tiers without loss: stages + final classifier = whole network;
    # the early exit heads are extra.
    stages = sum(m.segment_flops for m in typed)
    assert stages + typed[2].head_flops == typed[0].full_network_flops
    assert all(m.head_flops > 0 for m in typed)


def test_each_tier_holds_only_its_own_weights(exported):
    from safetensors.torch import load_file

    keys = [set(load_file(str(f / "weights.safetensors"))) for f in find_tier_folders(exported)]
    assert all(k.startswith(("blocks.", "heads.", "preprocess.")) for ks in keys for k in ks)
    assert any(k.startswith("preprocess.") for k in keys[0])
    assert not any(k.startswith("preprocess.") for k in keys[1] | keys[2])
    device_params = sum(v.numel() for v in load_file(str(exported / "device" / "weights.safetensors")).values())
    cloud_params = sum(v.numel() for v in load_file(str(exported / "cloud" / "weights.safetensors")).values())
    assert device_params < cloud_params  # layer4 lives only in the cloud


def test_tampered_weights_are_refused(exported):
    path = exported / "edge" / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="checksum"):
        load_tier_bundle(exported / "edge")


def test_not_a_bundle(tmp_path, exported):
    with pytest.raises(ConfigError, match="missing"):
        load_tier_bundle(tmp_path / "nowhere")
    manifest = json.loads((exported / "cloud" / "manifest.json").read_text())
    manifest["format"] = "something-else"
    (exported / "cloud" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="format"):
        load_tier_bundle(exported / "cloud")


def test_model_id_changes_with_weights(tiny_model, tmp_path):
    export_bundles(tiny_model, GATES, tmp_path / "a", ["x"] * 10)
    with torch.no_grad():
        tiny_model.backbone.classifier[-1].bias.add_(1.0)
    export_bundles(tiny_model, GATES, tmp_path / "b", ["x"] * 10)
    ids = [read_manifest(tmp_path / r / "cloud").model_id for r in ("a", "b")]
    assert ids[0] != ids[1]


def test_export_leaves_the_model_untouched(tiny_model, tmp_path):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    export_bundles(tiny_model, GATES, tmp_path, ["x"] * 10)
    assert not any(m.training for m in tiny_model.modules())
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())


@pytest.mark.parametrize("mutate, words", [
    (lambda m: m.pop("model_id"), "model_id"),
    (lambda m: m.update(tier_index=7), "tier_index"),
    (lambda m: m["weights"].update(file="../../etc/passwd"), "plain file name"),
    (lambda m: m["flops"].pop("heads"), "flops.heads"),
    (lambda m: m["gates"].append({"kind": "always"}), "one gate object per exit"),
    (lambda m: m["segment"].update(split=[1, 0]), "split"),
    (lambda m: m["input"].update(dtype="float64"), "input dtype"),
    (lambda m: m["gates"][0].update(threshold=float("nan")), "finite"),
    (lambda m: m["gates"][0].update(threshold="0.5"), "finite"),
])
def test_malformed_manifests_are_config_errors(exported, mutate, words):
    path = exported / "device" / "manifest.json"
    manifest = json.loads(path.read_text())
    mutate(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=words):
        load_tier_bundle(exported / "device")


def test_a_learned_bottleneck_travels_on_the_first_link(tmp_path):
    """The device sends the encoded features, the edge decodes them: served segments still equal the model, the
    link carries the bottleneck's shape, and the FLOPs still add up to the whole network's."""
    from common.model import BottleneckSpec, MultiExitNet
    from tests.conftest import tiny_spec

    torch.manual_seed(0)
    model = MultiExitNet(tiny_spec(bottleneck=BottleneckSpec(channels=2, stride=2)))
    model.train()
    with torch.no_grad():
        model(torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8))
    model.eval()
    export_bundles(model, GATES, tmp_path, [f"c{i}" for i in range(10)])
    bundles = [load_tier_bundle(f) for f in find_tier_folders(tmp_path)]
    first_features = model.backbone.feature_shapes(model.spec.input_shape)[model.spec.exit_points[0] - 1]
    assert bundles[0].manifest.output_shape == (2, first_features[1] // 2, first_features[2] // 2)
    assert bundles[1].manifest.input_shape == bundles[0].manifest.output_shape
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        want = model(x)
        h, got = x, []
        for b in bundles:
            h, logits = b.segment(h)
            got += logits
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    m = [b.manifest for b in bundles]
    assert sum(t.segment_flops for t in m) + m[2].head_flops == m[0].full_network_flops
