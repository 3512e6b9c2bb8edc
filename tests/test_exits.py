"""Cascade exit heads: shapes, the detached cascade input, unchanged plain heads, and the spec's round trip."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from common.model import CascadeExitHead, ExitHeadSpec, ModelSpec, MultiExitNet, apply_head


def spec(cascade: bool, points=(1, 2, 3)) -> ModelSpec:
    return ModelSpec(architecture="resnet18_cifar", num_classes=7, width=0.0625, exit_points=points,
                     exit_head=ExitHeadSpec(conv_channels=4, conv_stride=2), cascade=cascade)


def images(n: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_cascade_model_gives_one_logit_row_per_exit():
    torch.manual_seed(0)
    model = MultiExitNet(spec(True))
    assert isinstance(model.exits[0], nn.Sequential)
    assert all(isinstance(h, CascadeExitHead) for h in model.exits[1:])
    assert model.exits[1].linear.in_features == 4 + 7
    outputs = model(images())
    assert [tuple(o.shape) for o in outputs] == [(3, 7)] * 4


def test_no_gradient_flows_from_a_head_into_the_previous_head_through_the_cascade_input():
    torch.manual_seed(0)
    model = MultiExitNet(spec(True))
    outputs = model(images())
    outputs[2].sum().backward()  # the third early head reads the second's logits
    for p in model.exits[1].parameters():
        assert p.grad is None or not p.grad.any()
    assert model.exits[2].linear.weight.grad.any()


def test_apply_head_refuses_a_cascade_head_without_previous_logits():
    head = CascadeExitHead((4, 8, 8), 7, ExitHeadSpec())
    features = torch.randn(2, 4, 8, 8)
    assert apply_head(head, features, torch.randn(2, 7)).shape == (2, 7)
    with pytest.raises(ValueError, match="previous"):
        apply_head(head, features, None)
    plain = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 7))
    assert torch.equal(apply_head(plain, features, torch.randn(2, 7)), plain(features))


def test_a_plain_spec_keeps_its_state_dict_keys():
    keys = set(MultiExitNet(spec(False)).state_dict())
    assert {"exits.1.0.weight", "exits.1.1.running_mean", "exits.1.5.weight", "exits.1.5.bias"} <= keys
    assert not any(".linear." in k or ".body." in k for k in keys)


def test_the_spec_round_trips_and_old_dicts_load():
    s = spec(True)
    assert ModelSpec.from_dict(s.to_dict()) == s
    old = spec(False).to_dict()
    del old["cascade"]
    assert ModelSpec.from_dict(old) == spec(False)


def test_the_cost_table_of_a_cascade_model_counts_its_wider_linear_layers():
    from common.model.flops import count_flops
    from common.model.split import cost_table

    model = MultiExitNet(spec(True))
    plain, _ = cost_table(MultiExitNet(spec(False)))
    costs, full = cost_table(model)
    # leaving at the final exit runs every stage and every head: the whole forward, counted independently
    assert costs[-1] == count_flops(model, torch.zeros(1, 3, 32, 32, dtype=torch.uint8)) and full < costs[-1]
    assert costs[0] == plain[0] and costs[1] - plain[1] == 2 * 49 and costs[2] - plain[2] == 2 * 2 * 49


def test_deeper_heads_stack_unstrided_convs_and_cost_what_they_add():
    from common.errors import ConfigError
    from common.model.split import cost_table

    deep = ModelSpec(**{**spec(False).__dict__, "exit_head": ExitHeadSpec(conv_channels=4, conv_stride=2,
                                                                            conv_layers=2)})
    model = MultiExitNet(deep)
    convs = [m for m in model.exits[0] if isinstance(m, nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2), (1, 1)] and convs[1].in_channels == 4
    assert [tuple(o.shape) for o in model(images())] == [(3, 7)] * 4
    # Every early exit pays for the second conv (and its BN): 3x3x4x4 multiply-adds per output position, at least.
    shallow, _ = cost_table(MultiExitNet(spec(False)))
    costs, _ = cost_table(model)
    assert all(d > s for d, s in zip(costs[:-1], shallow[:-1]))
    assert ModelSpec.from_dict(deep.to_dict()) == deep
    old = deep.to_dict()
    del old["exit_head"]["conv_layers"]  # a bundle written before heads could be deeper: one conv
    assert ModelSpec.from_dict(old) == spec(False)
    with pytest.raises(ConfigError, match="conv_layers >= 1"):
        ExitHeadSpec(conv_channels=4, conv_layers=0)
