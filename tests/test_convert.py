"""The model converter: any traced model cut after named modules equals the model, and bad cuts are refused."""
import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from common.wire import codecs
from common.errors import ConfigError
from common.model import build_backbone
from common.model.convert import convert, load_pretrained, source_state_dict
from common.model.zoo import TinyResidualNet

RESNET_CUTS = ["maxpool", "layer1", "layer2", "layer3", "layer4"]


def _settled(model: nn.Module, shape=(3, 32, 32)) -> nn.Module:
    """``model`` in eval mode with BatchNorm statistics that are not the identity."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, *shape))
    return model.eval()


@pytest.mark.parametrize("make, cuts", [
    (lambda: torchvision.models.resnet18(num_classes=7), RESNET_CUTS),
    (lambda: torchvision.models.resnet50(num_classes=7), ["layer1.2", "layer2.0", "layer3"]),
    (lambda: torchvision.models.mobilenet_v2(num_classes=7, width_mult=0.25), ["features.2", "features.7"]),
    (lambda: torchvision.models.DenseNet(8, (6, 12, 24, 16), 16, num_classes=7),
     ["features.transition1", "features.norm5"]),
])
def test_converted_model_equals_the_original(make, cuts):
    model = _settled(make())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        backbone = convert(model, cuts, num_classes=7).eval()
        h = x
        for stage in backbone.stages:
            h = stage(h)
        got = backbone.classifier(h)
    assert backbone.stage_names == cuts
    assert torch.equal(got, expected)
    # Every parameter of the model is in exactly one stage or the classifier, under its own name.
    assert set(source_state_dict(backbone)) == set(model.state_dict())


@pytest.mark.parametrize("cuts, words", [
    (["layer1.0.conv1"], "also used after the cut"),       # the residual branch would be cut in two
    (["layer1.0.bn2"], "also used after the cut"),
    (["layer9"], "has no module of that name"),
    (["layer2", "layer1"], "in the order the model runs them"),
    (["layer1", "layer1.0"], "inside the first"),
    (["fc"], "nothing runs after the last cut"),
    ([], "at least one module"),
])
def test_bad_cuts_are_clear_errors(cuts, words):
    with pytest.raises(ConfigError, match=words):
        convert(torchvision.models.resnet18(), cuts, num_classes=1000)


def test_the_input_may_not_skip_over_a_cut():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.b(self.a(x)) + x

    with pytest.raises(ConfigError, match="model input"):
        convert(Skip(), ["a"], num_classes=3)


def test_a_stage_never_writes_into_the_tensor_it_receives():
    # DenseNet's classifier starts with F.relu(x, inplace=True); tiers hand it read-only wire tensors.
    backbone = build_backbone("densenet121", num_classes=5, width=0.125).eval()
    features = torch.randn(2, *backbone.feature_shapes((3, 32, 32))[-1])
    msg = codecs.encode(features)
    wire = codecs.decode(msg)
    with torch.no_grad():
        logits = backbone.classifier(wire)
    assert torch.equal(wire, features)  # relu did not write negative values to zero in the request's bytes
    assert logits.shape == (2, 5)


def test_pretrained_weights_load_by_the_original_names(tmp_path):
    torch.manual_seed(1)
    source = _settled(TinyResidualNet(num_classes=10, width=1.0, in_channels=3))
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    backbone = build_backbone("tiny", num_classes=10).eval()
    assert load_pretrained(backbone, path) == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(backbone(x), source(x))
    # Another class count: everything but the final classifier is taken over; torch.save'd files load too.
    torch.save(source.state_dict(), tmp_path / "tiny.pt")
    other = build_backbone("tiny", num_classes=3)
    assert sorted(load_pretrained(other, tmp_path / "tiny.pt")) == ["fc.bias", "fc.weight"]
    with pytest.raises(ConfigError, match="wrong shape"):
        load_pretrained(build_backbone("tiny", num_classes=10, width=2.0), path)
    with pytest.raises(ConfigError, match="do not exist"):
        load_pretrained(backbone, tmp_path / "missing.safetensors")


def test_resnet_entries_at_width_one_are_torchvisions_networks():
    for name, reference in (("resnet18", torchvision.models.resnet18), ("resnet50", torchvision.models.resnet50)):
        ours = source_state_dict(build_backbone(name, num_classes=1000))
        theirs = reference().state_dict()
        assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
