import pytest
import torch

from common.errors import ConfigError
from common.model import ModelSpec, MultiExitNet, build_backbone, list_backbones, register_backbone
from common.model.split import cost_table, default_split, plan_segments, split_model
from tests.conftest import tiny_spec


def test_registry_fails_loudly():
    assert "resnet18_cifar" in list_backbones()
    with pytest.raises(ConfigError, match="unknown backbone"):
        build_backbone("resnet1000")
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("resnet18_cifar")(lambda **kw: None)


def test_feature_shape_table():
    model = MultiExitNet(ModelSpec(width=0.25))
    shapes = model.backbone.feature_shapes((3, 32, 32))
    assert model.backbone.stage_names == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert shapes == [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (128, 4, 4)]


def test_width_one_is_the_standard_cifar_resnet18():
    backbone = build_backbone("resnet18_cifar", num_classes=10, width=1.0)
    assert sum(p.numel() for p in backbone.parameters()) == 11_173_962  # the usual CIFAR ResNet-18 count


def test_segments_in_sequence_equal_the_whole_model(tiny_model):
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        expected = tiny_model(x)
        h = x
        got = []
        for segment in split_model(tiny_model):
            h, logits = segment(h)
            got += logits
    assert len(got) == len(expected) == 3
    for a, b in zip(got, expected):
        assert torch.equal(a, b)  # bit-for-bit: the segments are the model's own modules


def test_segments_hold_disjoint_parameters(tiny_model):
    segments = split_model(tiny_model)
    ids = [{id(p) for p in s.parameters()} for s in segments]
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2]) and not (ids[0] & ids[2])
    total = sum(len(i) for i in ids)
    assert total == len(list(tiny_model.parameters()))  # nothing lost, nothing duplicated


def test_plan_follows_exit_points():
    spec = tiny_spec(exit_points=(1, 3))
    plans = plan_segments(spec, ["stem", "layer1", "layer2", "layer3", "layer4"])
    assert [(p.tier, p.start, p.end) for p in plans] == [("device", 0, 1), ("edge", 1, 3), ("cloud", 3, 5)]
    assert [p.is_last for p in plans] == [False, False, True]
    with pytest.raises(ConfigError, match="need at least 2 early exits"):
        plan_segments(tiny_spec(exit_points=(2,)), ["a", "b", "c", "d", "e"])


STAGES = ["stem", "layer1", "layer2", "layer3", "layer4"]


def test_default_split_spreads_the_early_exits_over_the_early_tiers():
    assert default_split(2, 3) == (0, 1)
    assert default_split(4, 3) == (1, 3)
    assert default_split(5, 3) == (2, 4)  # the earlier tier takes the extra one
    plans = plan_segments(tiny_spec(exit_points=(1, 2, 3, 4)), STAGES)
    assert [(p.tier, p.start, p.end, p.exits, p.points) for p in plans] == [
        ("device", 0, 2, (0, 1), (1, 2)), ("edge", 2, 4, (2, 3), (3, 4)), ("cloud", 4, 5, (4,), (5,))]


def test_an_explicit_split_may_leave_early_exits_to_the_last_tier():
    plans = plan_segments(tiny_spec(exit_points=(1, 2, 3, 4)), STAGES, split=(0, 2))
    assert [(p.start, p.end, p.exits) for p in plans] == [(0, 1, (0,)), (1, 3, (1, 2)), (3, 5, (3, 4))]
    assert [p.exit_index for p in plans] == [0, 2, 4]


@pytest.mark.parametrize("split", [(1,), (1, 1), (2, 1), (0, 4), (-1, 2)])
def test_bad_splits_are_refused(split):
    with pytest.raises(ConfigError, match="split"):
        plan_segments(tiny_spec(exit_points=(1, 2, 3, 4)), STAGES, split=split)


def test_several_exits_per_segment_compute_the_whole_model():
    torch.manual_seed(0)
    model = MultiExitNet(tiny_spec(exit_points=(1, 2, 3, 4), cascade=True)).eval()
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        expected = model(x)
        h, previous, got = x, None, []
        for segment in split_model(model):
            h, logits = segment(h, previous)
            got += logits
            previous = logits[-1]
    assert [len(s.heads) for s in split_model(model)] == [2, 2, 1]
    assert len(got) == len(expected) == 5 and all(torch.equal(a, b) for a, b in zip(got, expected))
    costs, full = cost_table(model)
    assert costs == sorted(costs) and costs[-1] > full  # every head on the way is paid for


@pytest.mark.parametrize("points", [(0, 2), (2, 2), (3, 2), (2, 5)])
def test_bad_exit_points(points):
    with pytest.raises(ConfigError, match="exit points"):
        MultiExitNet(tiny_spec(exit_points=points))
