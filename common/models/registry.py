"""Backbone registry: build a staged backbone by name, fail loudly on unknown or duplicate names."""
from __future__ import annotations

from typing import Callable

from torch import nn

from common.errors import ConfigError

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that publishes a backbone entrypoint under ``name``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _BUILDERS:
            raise ValueError(f"backbone {name!r} is already registered")
        _BUILDERS[name] = fn
        return fn

    return wrap


def build_backbone(name: str, **kwargs) -> nn.Module:
    """Build the backbone registered as ``name`` with keyword arguments ``kwargs``."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ConfigError(f"unknown backbone {name!r}; known: {', '.join(sorted(_BUILDERS))}") from None
    return builder(**kwargs)


def list_backbones() -> list[str]:
    return sorted(_BUILDERS)
