"""Registered backbones beyond the hand-built CIFAR ResNet-18: torchvision's networks cut into stages by the
converter, LeNet for MNIST, and a tiny residual network for tests and examples.

Every entry takes ``num_classes``, ``width`` (channel multiplier; 1.0 = the published network) and ``in_channels``.
At width 1 with 3 input channels the torchvision-based entries are exactly torchvision's networks, with torchvision's
parameter names, so weights saved from torchvision load with ``common.model.convert.load_pretrained``.
torchvision is imported when one of them is first built, not when they are registered: importing it costs every
tier process more than a second at start-up.
"""
from __future__ import annotations

import functools

from torch import nn

from common.model.convert import convert
from common.model.registry import register_backbone
from common.model.staged import StagedBackbone

RESNET_STAGES = ["stem", "layer1", "layer2", "layer3", "layer4"]


def scaled(channels: int, width: float, minimum: int = 4) -> int:
    """``channels`` times the width multiplier, rounded, at least ``minimum``."""
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    return max(minimum, int(round(channels * width)))


def _init_conv(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # as torchvision initialises convs
    return conv


@functools.cache
def scaled_resnet_class() -> type[nn.Module]:
    """torchvision's ResNet class, extended with a width multiplier (defined on first use; see module docstring)."""
    from torchvision.models.resnet import ResNet

    class ScaledResNet(ResNet):
        """torchvision's ResNet with every channel count times ``width``, ``in_channels`` inputs and, with
        ``cifar_stem``, the 3x3 stride-1 stem without max-pool used for 32x32 images."""

        def __init__(self, block: type[nn.Module], layers: list[int], num_classes: int, width: float,
                     in_channels: int, cifar_stem: bool) -> None:
            self._width = width
            super().__init__(block, layers, num_classes=num_classes)
            stem = scaled(64, width)
            if cifar_stem or stem != 64 or in_channels != 3:
                kernel, stride = (3, 1) if cifar_stem else (7, 2)
                self.conv1 = _init_conv(nn.Conv2d(in_channels, stem, kernel, stride, kernel // 2, bias=False))
                self.bn1 = nn.BatchNorm2d(stem)
            if cifar_stem:
                self.maxpool = nn.Identity()
            if width != 1.0:
                self.fc = nn.Linear(scaled(512, width) * block.expansion, num_classes)

        def _make_layer(self, block, planes, blocks, stride=1, dilate=False):  # noqa: ANN001 (torchvision's)
            if planes == 64:  # layer1 is built first and takes the stem's (scaled) output
                self.inplanes = scaled(64, self._width)
            return super()._make_layer(block, scaled(planes, self._width), blocks, stride, dilate)

    return ScaledResNet


def _resnet(block: str, layers: list[int], cifar_stem: bool, num_classes: int, width: float,
            in_channels: int) -> StagedBackbone:
    from torchvision.models import resnet

    model = scaled_resnet_class()(getattr(resnet, block), layers, num_classes, width, in_channels, cifar_stem)
    return convert(model, ["maxpool", "layer1", "layer2", "layer3", "layer4"], num_classes, RESNET_STAGES)


def _register_resnets() -> None:
    nets = {"resnet18": ("BasicBlock", [2, 2, 2, 2]), "resnet34": ("BasicBlock", [3, 4, 6, 3]),
            "resnet50": ("Bottleneck", [3, 4, 6, 3])}
    for name, (block, layers) in nets.items():
        for suffix, cifar in (("", False), ("_cifar", True)):
            if name + suffix == "resnet18_cifar":
                continue  # the hand-built one in common.model.resnet_cifar

            def build(num_classes: int = 10, width: float = 1.0, in_channels: int = 3, _b=block, _l=layers,
                      _c=cifar) -> StagedBackbone:
                return _resnet(_b, _l, _c, num_classes, width, in_channels)

            stem = "3x3 stride-1 stem for 32x32 inputs" if cifar else "ImageNet stem (7x7 stride 2 + max-pool)"
            build.__doc__ = f"torchvision's {name} with the {stem}: stem, layer1..layer4, pool + fc."
            register_backbone(name + suffix, exit_points=(2, 3))(build)


_register_resnets()


def _vgg(config: str, batch_norm: bool, num_classes: int, width: float, in_channels: int) -> StagedBackbone:
    """torchvision's VGG; a stage ends at every max-pool; the classifier is avgpool + the 3 linear layers."""
    from torchvision.models.vgg import VGG, cfgs as vgg_cfgs, make_layers

    cfg = [v if v == "M" else scaled(v, width) for v in vgg_cfgs[config]]
    features = make_layers(cfg, batch_norm=batch_norm)
    if in_channels != 3:
        features[0] = _init_conv(nn.Conv2d(in_channels, cfg[0], 3, padding=1))
    model = VGG(features, num_classes=num_classes)
    if width != 1.0:  # the stock classifier assumes 512 x 7 x 7 features and 4096 hidden units
        hidden = scaled(4096, width)
        model.classifier = nn.Sequential(
            nn.Linear(cfg[-2] * 7 * 7, hidden), nn.ReLU(True), nn.Dropout(), nn.Linear(hidden, hidden), nn.ReLU(True),
            nn.Dropout(), nn.Linear(hidden, num_classes))
    pools = [f"features.{i}" for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]
    return convert(model, pools, num_classes, [f"block{i}" for i in range(1, len(pools) + 1)])


def _register_vggs() -> None:
    for name, config in (("vgg11", "A"), ("vgg19", "E")):
        for suffix, bn in (("", False), ("_bn", True)):

            def build(num_classes: int = 10, width: float = 1.0, in_channels: int = 3, _c=config,
                      _bn=bn) -> StagedBackbone:
                return _vgg(_c, _bn, num_classes, width, in_channels)

            build.__doc__ = f"torchvision's {name}{suffix}: five conv blocks ending in max-pools, then the classifier."
            register_backbone(name + suffix, exit_points=(2, 3))(build)


_register_vggs()


@register_backbone("densenet121", exit_points=(2, 3))
def densenet121(num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> StagedBackbone:
    """torchvision's DenseNet-121 (growth rate and stem channels times ``width``): stem, then a stage per dense block
    with its transition; the classifier is the final ReLU, pool and linear layer."""
    from torchvision.models.densenet import DenseNet

    model = DenseNet(growth_rate=scaled(32, width, 2), block_config=(6, 12, 24, 16),
                     num_init_features=scaled(64, width), num_classes=num_classes)
    if in_channels != 3:
        old = model.features.conv0
        model.features.conv0 = _init_conv(nn.Conv2d(in_channels, old.out_channels, 7, 2, 3, bias=False))
    cuts = ["features.pool0", "features.transition1", "features.transition2", "features.transition3",
            "features.norm5"]
    return convert(model, cuts, num_classes, ["stem", "block1", "block2", "block3", "block4"])


@register_backbone("mobilenet_v2", exit_points=(2, 3))
def mobilenet_v2(num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> StagedBackbone:
    """torchvision's MobileNetV2 (``width`` is its width_mult), cut where the resolution halves: output strides
    2, 4, 8, 16 and 32 (after the last 1x1 conv); the classifier is pool, dropout and linear."""
    from torchvision.models.mobilenetv2 import MobileNetV2

    model = MobileNetV2(num_classes=num_classes, width_mult=width)
    if in_channels != 3:
        old = model.features[0][0]
        model.features[0][0] = _init_conv(nn.Conv2d(in_channels, old.out_channels, 3, 2, 1, bias=False))
    cuts = ["features.1", "features.3", "features.6", "features.13", "features.18"]
    return convert(model, cuts, num_classes, ["stride2", "stride4", "stride8", "stride16", "stride32"])


@register_backbone("lenet", exit_points=(1, 2))
def lenet(num_classes: int = 10, width: float = 1.0, in_channels: int = 1) -> StagedBackbone:
    """LeNet-5 for 1x28x28 digits (padded first conv): conv1, conv2, fc1 as stages, fc2 + fc3 as the classifier.
    An adaptive pool before fc1 keeps the 5x5 grid for other input sizes (at 28x28 it leaves the values as they are)."""
    c1, c2, f1, f2 = (scaled(c, width, 2) for c in (6, 16, 120, 84))
    stages = [
        ("conv1", nn.Sequential(nn.Conv2d(in_channels, c1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2))),
        ("conv2", nn.Sequential(nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2))),
        ("fc1", nn.Sequential(nn.AdaptiveAvgPool2d(5), nn.Flatten(), nn.Linear(c2 * 25, f1), nn.ReLU())),
    ]
    classifier = nn.Sequential(nn.Linear(f1, f2), nn.ReLU(), nn.Linear(f2, num_classes))
    return StagedBackbone(stages, classifier, num_classes=num_classes)


class Residual(nn.Module):
    """``x + body(x)``."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class TinyResidualNet(nn.Module):
    """A few-thousand-parameter CNN with one residual block: small enough for any test, shaped like real ones."""

    def __init__(self, num_classes: int, width: float, in_channels: int) -> None:
        super().__init__()
        c = scaled(16, width)

        def conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.stem = conv_bn(in_channels, c, 1)
        self.block1 = Residual(conv_bn(c, c, 1))
        self.block2 = conv_bn(c, 2 * c, 2)
        self.block3 = conv_bn(2 * c, 2 * c, 2)
        self.fc = nn.Linear(2 * c, num_classes)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


@register_backbone("tiny", exit_points=(1, 2))
def tiny(num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> StagedBackbone:
    """``TinyResidualNet`` through the converter: stem, block1, block2, block3; mean-pool + fc as classifier."""
    model = TinyResidualNet(num_classes, width, in_channels)
    return convert(model, ["stem", "block1", "block2", "block3"], num_classes)
