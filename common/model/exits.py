"""Exit heads sized from the feature shape at a stage boundary, and the multi-exit network used for training."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor, nn

from common.errors import ConfigError
from common.model.registry import build_backbone
from common.model.staged import StagedBackbone


def _refuse_unknown_keys(cls, d: dict, what: str) -> None:
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ConfigError(f"unknown {what} keys: {sorted(unknown)}")


class _FlatRecord:
    """``to_dict`` / ``from_dict`` for a frozen dataclass of plain values, refusing keys it does not have."""

    WHAT = "record"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        _refuse_unknown_keys(cls, d, cls.WHAT)
        return cls(**d)


@dataclass(frozen=True)
class ExitHeadSpec(_FlatRecord):
    """How an exit head is built: ``conv_layers`` blocks of ``conv_channels`` 3x3 conv + BN + ReLU (the first with
    ``conv_stride``, the others stride 1; ``conv_channels`` 0 = none), global pool, linear."""

    WHAT = "exit head"
    conv_channels: int = 0
    conv_stride: int = 1
    conv_layers: int = 1

    def __post_init__(self) -> None:
        if self.conv_channels < 0 or self.conv_stride < 1 or self.conv_layers < 1:
            raise ConfigError("an exit head needs conv_channels >= 0, conv_stride >= 1 and conv_layers >= 1, got "
                              f"{self.conv_channels}, {self.conv_stride} and {self.conv_layers}")


def build_exit_head(feature_shape: tuple[int, ...], num_classes: int, spec: ExitHeadSpec) -> nn.Module:
    """A BranchyNet-style side classifier for features of per-sample shape ``(C, H, W)``."""
    channels = feature_shape[0]
    layers: list[nn.Module] = []
    for k in range(spec.conv_layers if spec.conv_channels > 0 else 0):
        layers += [
            nn.Conv2d(channels, spec.conv_channels, 3, stride=spec.conv_stride if k == 0 else 1, padding=1,
                      bias=False),
            nn.BatchNorm2d(spec.conv_channels),
            nn.ReLU(inplace=True),
        ]
        channels = spec.conv_channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


class CascadeExitHead(nn.Module):
    """An exit head that also reads the previous early exit's logits (Zero Time Waste, Wolczyk et al., NeurIPS 2021).

    ``body`` is the usual head without its linear layer (optional conv + BN + ReLU, global pool, flatten); the linear
    layer reads ``cat([pooled, previous_logits])``, so ``C + K`` inputs. The caller passes ``previous`` detached: a
    later head learns to use an earlier head's answer without pulling that head's training towards its own.
    """

    def __init__(self, feature_shape: tuple[int, ...], num_classes: int, spec: ExitHeadSpec) -> None:
        super().__init__()
        plain = build_exit_head(feature_shape, num_classes, spec)
        self.body = nn.Sequential(*list(plain)[:-1])
        last: nn.Linear = plain[-1]
        self.linear = nn.Linear(last.in_features + num_classes, num_classes)

    def forward(self, features: Tensor, previous: Tensor) -> Tensor:
        return self.linear(torch.cat([self.body(features), previous], dim=1))


def apply_head(head: nn.Module, features: Tensor, previous: Tensor | None) -> Tensor:
    """Run any exit head: a ``CascadeExitHead`` gets ``previous`` (the previous early exit's logits; required),
    every other head (plain early heads, the backbone's final classifier) gets the features alone."""
    if isinstance(head, CascadeExitHead):
        if previous is None:
            raise ValueError("a cascade exit head needs the previous early exit's logits, got None")
        return head(features, previous)
    return head(features)


@dataclass(frozen=True)
class BottleneckSpec(_FlatRecord):
    """A learned bottleneck on the device→edge link (after the first exit point): the device encodes its features
    into ``channels`` maps at ``1/stride`` of their resolution (3x3 conv + BN), the edge decodes them back (nearest
    upsampling, 3x3 conv + BN + ReLU). ``channels`` 0 means none. Trained with everything else."""

    WHAT = "bottleneck"
    channels: int = 0
    stride: int = 1


def build_bottleneck(feature_shape: tuple[int, ...], spec: BottleneckSpec) -> tuple[nn.Module, nn.Module]:
    """``(encoder, decoder)`` for features of per-sample shape ``(C, H, W)``; the decoder restores that shape."""
    channels, height, width = feature_shape[0], feature_shape[-2], feature_shape[-1]
    if spec.channels < 1 or spec.stride < 1:
        raise ConfigError(f"a bottleneck needs channels >= 1 and stride >= 1, got {spec}")
    if height % spec.stride or width % spec.stride:
        raise ConfigError(f"bottleneck stride {spec.stride} does not divide the {height}x{width} features")
    encoder = nn.Sequential(nn.Conv2d(channels, spec.channels, 3, stride=spec.stride, padding=1, bias=False),
                            nn.BatchNorm2d(spec.channels))
    decoder = nn.Sequential(nn.Upsample(scale_factor=spec.stride, mode="nearest") if spec.stride > 1 else nn.Identity(),
                            nn.Conv2d(spec.channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                            nn.ReLU())
    return encoder, decoder


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the multi-exit network's structure (weights travel separately)."""

    architecture: str = "resnet18_cifar"
    num_classes: int = 10
    width: float = 0.25
    input_shape: tuple[int, int, int] = (3, 32, 32)
    exit_points: tuple[int, ...] = (2, 4)
    exit_head: ExitHeadSpec = ExitHeadSpec()
    bottleneck: BottleneckSpec = BottleneckSpec()
    # Every early exit head but the first also reads the previous early exit's logits (``CascadeExitHead``).
    cascade: bool = False
    # Per-channel normalisation of the [0, 1]-scaled input, one value per input channel (the device tier applies it).
    mean: tuple[float, ...] = (0.4914, 0.4822, 0.4465)
    std: tuple[float, ...] = (0.2470, 0.2435, 0.2616)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["exit_points"] = list(self.exit_points)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        d = dict(d)
        _refuse_unknown_keys(cls, d, "model spec")
        if "exit_head" in d:
            d["exit_head"] = ExitHeadSpec.from_dict(d["exit_head"])
        if "bottleneck" in d:
            d["bottleneck"] = BottleneckSpec.from_dict(d["bottleneck"])
        for key in ("input_shape", "exit_points", "mean", "std"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


class ImageNormalize(nn.Module):
    """uint8 (or 0..255 float) images -> float, scaled to [0, 1] and normalised per channel."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x.float() / 255.0 - self.mean) / self.std


class MultiExitNet(nn.Module):
    """A staged backbone with exit heads at ``spec.exit_points`` and the backbone's classifier as the last exit.

    Input is raw images (uint8, N x C x H x W); ``forward`` returns the logits of every exit, earliest first.
    This is the training-time view; deployment splits it with ``common.model.split``.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        channels = spec.input_shape[0]
        if not len(spec.mean) == len(spec.std) == channels:
            raise ConfigError(f"input has {channels} channel(s) but the normalisation gives mean {list(spec.mean)} "
                              f"and std {list(spec.std)}; give one value per channel")
        self.normalize = ImageNormalize(spec.mean, spec.std)
        self.backbone: StagedBackbone = build_backbone(spec.architecture, num_classes=spec.num_classes,
                                                       width=spec.width, in_channels=channels)
        n = len(self.backbone.stages)
        points = list(spec.exit_points)
        if points != sorted(set(points)) or not all(1 <= p < n for p in points):
            raise ConfigError(f"exit points must be increasing stage boundaries in 1..{n - 1}, got {points}")
        shapes = self.backbone.feature_shapes(spec.input_shape)
        self.exits = nn.ModuleList(
            CascadeExitHead(shapes[p - 1], spec.num_classes, spec.exit_head) if spec.cascade and i > 0
            else build_exit_head(shapes[p - 1], spec.num_classes, spec.exit_head)
            for i, p in enumerate(points)
        )
        self.bottleneck_encoder: nn.Module | None = None
        self.bottleneck_decoder: nn.Module | None = None
        if spec.bottleneck.channels:
            self.bottleneck_encoder, self.bottleneck_decoder = build_bottleneck(shapes[points[0] - 1], spec.bottleneck)

    @property
    def num_exits(self) -> int:
        return len(self.exits) + 1

    def _cross_link(self, k: int, x: Tensor) -> Tensor:
        """Features after stage boundary ``k`` as the next stage sees them: through the bottleneck on its link."""
        if self.bottleneck_encoder is not None and k == self.spec.exit_points[0]:
            return self.bottleneck_decoder(self.bottleneck_encoder(x))
        return x

    def forward(self, images: Tensor) -> list[Tensor]:
        features, final = self.exit_features(images)
        return self.early_logits(features) + [final]

    def exit_features(self, images: Tensor) -> tuple[list[Tensor], Tensor]:
        """What the early exit heads read (the features at every exit point, earliest first) and the final exit's
        logits: the backbone's side of ``forward``."""
        x = self.normalize(images)
        features: list[Tensor] = []
        points = set(self.spec.exit_points)
        for k, stage in enumerate(self.backbone.stages, start=1):
            x = stage(x)
            if k in points:
                features.append(x)
            x = self._cross_link(k, x)
        return features, self.backbone.classifier(x)

    def early_logits(self, features: list[Tensor]) -> list[Tensor]:
        """The early exits' logits from their features (``exit_features``); a cascade head reads the previous
        exit's logits detached."""
        outputs: list[Tensor] = []
        for head, x in zip(self.exits, features):
            outputs.append(apply_head(head, x, outputs[-1].detach() if outputs else None))
        return outputs

    def final_logits(self, images: Tensor) -> Tensor:
        """The network without its early exit heads (what the whole network's FLOPs count)."""
        x = self.normalize(images)
        for k, stage in enumerate(self.backbone.stages, start=1):
            x = self._cross_link(k, stage(x))
        return self.backbone.classifier(x)
