"""CIFAR-style ResNet-18 (3x3 stem, no max-pool) with a width multiplier, published as ordered stages.

The network is exposed as ``stages`` (an ``nn.ModuleList``) plus a final ``classifier``, so a split is a slice of the
list and every stage boundary is a place an exit head can be attached.
"""
from __future__ import annotations

from torch import Tensor, nn

from common.model.registry import register_backbone
from common.model.staged import StagedBackbone


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (He et al., 2016)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: Tensor) -> Tensor:
        # The input is never modified in place: tiers decode wire tensors zero-copy into read-only memory.
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _scaled(channels: int, width: float) -> int:
    return max(4, int(round(channels * width)))


def _resnet18_parts(num_classes: int, width: float, in_channels: int
                    ) -> tuple[nn.Module, list[list[nn.Module]], nn.Module]:
    """The stem, the four layers' blocks and the classifier of a CIFAR ResNet-18."""
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    chans = [_scaled(c, width) for c in (64, 128, 256, 512)]
    stem = nn.Sequential(
        nn.Conv2d(in_channels, chans[0], 3, stride=1, padding=1, bias=False),
        nn.BatchNorm2d(chans[0]),
        nn.ReLU(inplace=True),
    )
    layers: list[list[nn.Module]] = []
    in_ch = chans[0]
    for out_ch, stride in zip(chans, (1, 2, 2, 2)):
        layers.append([BasicBlock(in_ch, out_ch, stride), BasicBlock(out_ch, out_ch, 1)])
        in_ch = out_ch
    classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_ch, num_classes))
    return stem, layers, classifier


@register_backbone("resnet18_cifar")
def resnet18_cifar(num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> StagedBackbone:
    """ResNet-18 for 32x32 inputs: stem, layer1..layer4 (2 blocks each), global pool + linear classifier."""
    stem, layers, classifier = _resnet18_parts(num_classes, width, in_channels)
    stages: list[tuple[str, nn.Module]] = [("stem", stem)]
    stages += [(f"layer{i}", nn.Sequential(*blocks)) for i, blocks in enumerate(layers, start=1)]
    return StagedBackbone(stages, classifier, num_classes=num_classes)


@register_backbone("resnet18_cifar_blocks", exit_points=(3, 5))
def resnet18_cifar_blocks(num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> StagedBackbone:
    """The same ResNet-18 with one stage per residual block (stem, layer1.0, layer1.1, ..., layer4.1: 9 stages), so
    exits can also sit inside a layer (SDN, Kaya et al., 2019). The defaults (after layer1.1 and layer2.1) are
    ``resnet18_cifar``'s after layer1 and layer2. Parameters are those of ``resnet18_cifar`` in the same order;
    only their names differ (``stages.3.conv1`` here for ``stages.2.0.conv1`` there)."""
    stem, layers, classifier = _resnet18_parts(num_classes, width, in_channels)
    stages: list[tuple[str, nn.Module]] = [("stem", stem)]
    stages += [(f"layer{i}.{j}", block) for i, blocks in enumerate(layers, start=1) for j, block in enumerate(blocks)]
    return StagedBackbone(stages, classifier, num_classes=num_classes)
