"""Export a trained checkpoint as per-tier bundles.

``python -m training.export --checkpoint FILE --out DIR [--gate SPEC ...]`` writes ``DIR/device``, ``DIR/edge`` and
``DIR/cloud``, each with ``manifest.json`` and only that tier's weights. Gates are the checkpoint's calibrated ones
unless overridden (one ``--gate`` per early exit, e.g. ``--gate confidence:0.9 --gate entropy:0.3``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common.bundle import export_bundles
from common.cli import run
from common.errors import ConfigError
from common.gates import gate_from_dict, parse_gate
from common.plugins import add_plugin_arg, use_plugins
from training import checkpoint


def export(checkpoint_path: Path, out: Path, gate_specs: list[str] | None = None) -> list[Path]:
    """Write the bundles of a checkpoint: its active policy's gates (or ``gate_specs``) plus every stored policy."""
    model, meta = checkpoint.load(checkpoint_path)
    policies = {name: [gate_from_dict(g) for g in gs] for name, gs in (meta.get("policies") or {}).items()}
    if gate_specs:
        if len(gate_specs) != model.num_exits - 1:
            raise ConfigError(f"give one --gate per early exit ({model.num_exits - 1}), got {len(gate_specs)}")
        gates, active = [parse_gate(s) for s in gate_specs], "command-line"
    elif meta.get("gates") is None:
        raise ConfigError(f"{checkpoint_path} is not calibrated yet (training stopped at {meta.get('progress')}): "
                          "run python -m training.calibrate --checkpoint FILE, or pass --gate per exit")
    else:
        gates, active = [gate_from_dict(g) for g in meta["gates"]], meta.get("policy")
    return export_bundles(model, gates, out, meta["class_names"], policies=policies, active=active,
                          calibration={} if gate_specs else meta.get("calibration"))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint.safetensors written by training.train")
    p.add_argument("--out", type=Path, required=True, help="bundle root to write")
    p.add_argument("--gate", action="append", default=None, help="gate override per early exit (repeatable)")
    add_plugin_arg(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    use_plugins(args.plugin)
    for folder in export(args.checkpoint, args.out, args.gate):
        print(folder)
    return 0


if __name__ == "__main__":
    run(main)
