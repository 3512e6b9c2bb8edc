"""Backbone registry: build a staged backbone by name, fail loudly on unknown or duplicate names.

Each entry also says where it is meant to be split by default (``exit_points``: the stage boundaries of the device
and edge exits); a run may override them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from common.errors import ConfigError

DEFAULT_EXIT_POINTS = (2, 3)


@dataclass(frozen=True)
class BackboneInfo:
    """A registered backbone: its builder and the defaults a run falls back on."""

    name: str
    builder: Callable[..., nn.Module]
    exit_points: tuple[int, ...] = DEFAULT_EXIT_POINTS


_REGISTRY: dict[str, BackboneInfo] = {}


def register_backbone(name: str, *, exit_points: tuple[int, ...] = DEFAULT_EXIT_POINTS
                      ) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that publishes a backbone entrypoint under ``name``.

    The entrypoint takes ``num_classes``, ``width`` and ``in_channels`` keywords and returns a ``StagedBackbone``.
    """

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = BackboneInfo(name, fn, tuple(exit_points))
        return fn

    return wrap


def backbone_info(name: str) -> BackboneInfo:
    """The registry entry of ``name``; an unknown name is a ``ConfigError`` listing the known ones.

    Names missing from the registry are looked up once more after importing the plugin modules named in
    ``SPLITEXIT_PLUGINS`` (see ``common.plugins``), so every command finds user-registered backbones.
    """
    if name not in _REGISTRY:
        from common.plugins import import_env_plugins  # local: plugins import this module

        import_env_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown backbone {name!r}; known: {', '.join(sorted(_REGISTRY))} (a backbone of your "
                          "own must be registered by a module given with --plugin or SPLITEXIT_PLUGINS)") from None


def build_backbone(name: str, **kwargs) -> nn.Module:
    """Build the backbone registered as ``name`` with keyword arguments ``kwargs``."""
    return backbone_info(name).builder(**kwargs)


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)
