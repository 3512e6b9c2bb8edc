"""Training checkpoints: one safetensors file holding the weights and, in its metadata header, JSON describing the
model spec, class names, calibrated gates and the resolved training config. Nothing is pickled."""
from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from common.errors import ConfigError
from common.model import ModelSpec, MultiExitNet

META_KEY = "splitexit"


def save(model: MultiExitNet, meta: dict, path: Path) -> None:
    """Write atomically: a crash mid-write never leaves a truncated checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "model": model.spec.to_dict()}
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={META_KEY: json.dumps(meta)})
    os.replace(tmp, path)


def read_meta(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except Exception as e:  # safetensors raises its own error types for foreign files
        raise ConfigError(f"{path} is not a safetensors checkpoint: {e}") from None
    if raw is None:
        raise ConfigError(f"{path} is a safetensors file but not a SplitExit checkpoint")
    return json.loads(raw)


def load(path: Path) -> tuple[MultiExitNet, dict]:
    """The model (eval mode) and its metadata."""
    meta = read_meta(path)
    model = MultiExitNet(ModelSpec.from_dict(meta["model"]))
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval(), meta
