"""Importing user modules that register backbones of their own (``--plugin MODULE``, ``SPLITEXIT_PLUGINS``).

A plugin is any importable Python module whose import registers backbones with ``common.model.register_backbone``.
``use_plugins`` imports the modules a command was given and also records them in the ``SPLITEXIT_PLUGINS``
environment variable (comma-separated), so the processes the command starts - the launcher's tiers - import them too,
and so does any code path that meets an unregistered backbone name (``common.model.registry.backbone_info``).
Bundles never name code to import: which modules to trust is always the operator's decision.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from common.errors import ConfigError

PLUGINS_ENV = "SPLITEXIT_PLUGINS"


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def import_plugin(name: str) -> None:
    """Import module ``name``; a module that cannot be imported is a ``ConfigError`` naming it."""
    try:
        importlib.import_module(name)
    except ImportError as e:
        raise ConfigError(f"cannot import plugin module {name!r}: {e}") from None


def import_env_plugins() -> None:
    """Import every module listed in ``SPLITEXIT_PLUGINS`` (already imported ones cost nothing)."""
    for name in _split(os.environ.get(PLUGINS_ENV, "")):
        import_plugin(name)


def use_plugins(names: list[str] | None) -> None:
    """Import ``names`` now and add them to ``SPLITEXIT_PLUGINS`` for child processes.

    The folder each module was found in is added to ``PYTHONPATH`` too: child processes may run in another working
    directory (the launcher starts tiers from the repository root), yet must import the same module.
    """
    names = [n for v in names or [] for n in _split(v)]
    for name in names:
        import_plugin(name)
        _export_search_path(name)
    known = _split(os.environ.get(PLUGINS_ENV, ""))
    merged = known + [n for n in names if n not in known]
    if merged:
        os.environ[PLUGINS_ENV] = ",".join(merged)


def _export_search_path(name: str) -> None:
    top = sys.modules[name.partition(".")[0]]
    file = getattr(top, "__file__", None)
    if not file:
        return
    path = Path(file).resolve().parent
    folder = str(path.parent if Path(file).name == "__init__.py" else path)
    entries = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if folder not in entries:
        os.environ["PYTHONPATH"] = os.pathsep.join([*entries, folder])


def add_plugin_arg(parser: argparse.ArgumentParser) -> None:
    """The ``--plugin MODULE`` option (repeatable) shared by every command that builds models."""
    parser.add_argument("--plugin", action="append", default=None, metavar="MODULE",
                        help="import this module first; it may register backbones of its own (repeatable)")
