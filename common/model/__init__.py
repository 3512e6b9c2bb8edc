"""Backbones as ordered stages, exit heads, and the multi-exit network."""
from common.model import resnet_cifar, zoo  # noqa: F401  (register the backbone entrypoints)
from common.model.exits import (BottleneckSpec, CascadeExitHead, ExitHeadSpec, ImageNormalize, ModelSpec, MultiExitNet,
                                apply_head, build_exit_head)
from common.model.registry import backbone_info, build_backbone, list_backbones, register_backbone
from common.model.staged import StagedBackbone

__all__ = [
    "BottleneckSpec", "CascadeExitHead", "ExitHeadSpec", "ImageNormalize", "ModelSpec", "MultiExitNet", "StagedBackbone",
    "apply_head", "backbone_info", "build_backbone", "build_exit_head", "list_backbones", "register_backbone",
]
