"""resnet18_cifar_blocks: the same ResNet-18 as resnet18_cifar, one stage per residual block."""
from __future__ import annotations

import torch

from common.model import ModelSpec, MultiExitNet, backbone_info, build_backbone
from common.model.split import cost_table


def test_nine_block_stages_with_the_same_parameters_and_outputs_as_resnet18_cifar():
    torch.manual_seed(0)
    layers = build_backbone("resnet18_cifar", num_classes=10, width=0.125).eval()
    torch.manual_seed(0)
    blocks = build_backbone("resnet18_cifar_blocks", num_classes=10, width=0.125).eval()
    assert blocks.stage_names == ["stem"] + [f"layer{i}.{j}" for i in range(1, 5) for j in (0, 1)]
    a, b = list(layers.state_dict().values()), list(blocks.state_dict().values())
    assert [t.shape for t in a] == [t.shape for t in b]
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # same seed, same construction order: same initial weights
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(layers(x), blocks(x))
    shapes = blocks.feature_shapes((3, 32, 32))
    assert shapes[2] == layers.feature_shapes((3, 32, 32))[1] and shapes[4] == (16, 16, 16)


def test_default_exits_sit_where_resnet18_cifars_do_and_exits_can_sit_inside_a_layer():
    assert backbone_info("resnet18_cifar_blocks").exit_points == (3, 5)
    model = MultiExitNet(ModelSpec(architecture="resnet18_cifar_blocks", width=0.125, exit_points=(2, 3, 4, 6)))
    assert [tuple(o.shape) for o in model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))] == [(2, 10)] * 5
    costs, full = cost_table(model)
    assert costs == sorted(costs) and 0 < costs[0] < 0.25 * full
