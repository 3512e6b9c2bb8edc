"""Export a trained checkpoint as per-tier bundles.

``python -m training.export --checkpoint FILE --out DIR [--gate SPEC ...] [--split I,J]`` writes ``DIR/device``,
``DIR/edge`` and ``DIR/cloud``, each with ``manifest.json`` and only that tier's weights and exits. A model with more
early exits than tiers before the last spreads them over those tiers unless ``--split`` names each one's last exit. Gates are the checkpoint's calibrated ones
unless overridden (one ``--gate`` per early exit, e.g. ``--gate confidence:0.9 --gate entropy:0.3``).
``export_bundles`` is the one writer of the bundle format that ``common.model.bundle`` reads.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import hashlib
import json

import torch
from safetensors.torch import save_file

from common.cli import exit_list, run
from common.errors import ConfigError
from common.model import ModelSpec, MultiExitNet
from common.model.bundle import FORMAT, MANIFEST, WEIGHTS, sha256_file
from common.model.flops import count_flops
from common.model.gates import Gate, gate_from_dict, gate_to_dict, needs_history, parse_gate
from common.model.split import TIER_NAMES, SegmentPlan, build_segment, plan_segments, segment_flops
from common.plugins import add_plugin_arg, use_plugins
from common.wire.codecs import WireCodec, wire_to_dict
from training import checkpoint


def _plan_dict(plan: SegmentPlan, spec: ModelSpec, split: tuple[int, ...]) -> dict:
    return {
        "start": plan.start, "end": plan.end, "stages": list(plan.stage_names), "split": list(split),
        "exits": [{"index": e, "point": p, "head": "final" if e == len(spec.exit_points) else spec.exit_head.to_dict()}
                  for e, p in zip(plan.exits, plan.points)],
        "exit_index": plan.exit_index,
    }


def export_bundles(
    model: MultiExitNet, gates: list[Gate], out: Path, class_names: list[str], tiers: tuple[str, ...] = TIER_NAMES,
    policies: dict[str, list[Gate]] | None = None, active: str | None = None,
    calibration: dict[str, dict] | None = None, wires: list[WireCodec] | None = None, split=None,
) -> list[Path]:
    """Write one bundle folder per tier under ``out``; ``gates[e]`` guards early exit ``e`` of the model.

    ``split`` names the last exit of each tier but the last (``common.model.split.default_split`` when not given).
    ``policies`` (name -> one gate per early exit) are stored too, so a tier can switch policy at start-up
    (``--policy NAME``) without retraining; ``active`` names the policy ``gates`` came from. ``calibration``
    (policy name -> how its thresholds were chosen: method, objective, target, delta, ...) goes with the tiers holding
    early exits. ``wires[i]`` is the codec tier i's outgoing link uses by default (a planner's choice; float32 if not
    given). Requests between tiers carry the earlier exits' logits when a head (cascade) or any stored gate reads them.
    """
    spec = model.spec
    plans = plan_segments(spec, model.backbone.stage_names, tiers, split)
    split = tuple(p.exit_index for p in plans[:-1])
    policies = policies or {}
    num_early = model.num_exits - 1
    if wires is not None and len(wires) != len(plans) - 1:
        raise ConfigError(f"need one link codec for each of the {len(plans) - 1} links, got {len(wires)}")
    for name, gs in {"gates": gates, **policies}.items():
        if len(gs) != num_early:
            raise ConfigError(f"{name}: need one gate for each of the {num_early} early exits, got {len(gs)}")
    history = spec.cascade or any(needs_history(g) for gs in (gates, *policies.values()) for g in gs)
    model = model.eval()
    x = torch.zeros((1, *spec.input_shape), dtype=torch.uint8)
    # Counted on the whole network, independently of the split: the per-tier figures must add up to it (tested).
    full_flops = count_flops(_Backbone(model), x)
    parts = []  # (plan, segment, example input, FLOPs, output shape)
    for plan, flops in zip(plans, segment_flops(model, tiers, split)):
        segment = build_segment(model, plan).eval()
        with torch.no_grad():
            features = segment.body(x)
        parts.append((plan, segment, x, flops, tuple(features.shape[1:])))
        x = features
    digest = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode())
    digest.update(json.dumps(split).encode())
    folders = []
    for plan, segment, *_ in parts:
        folder = out / plan.tier
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().clone() for k, v in segment.state_dict().items()}, str(folder / WEIGHTS))
        digest.update(sha256_file(folder / WEIGHTS).encode())
        folders.append(folder)
    model_id = f"{spec.architecture}-{digest.hexdigest()[:16]}"
    for (plan, _, x_in, flops, out_shape), folder in zip(parts, folders):
        early = [e for e in plan.exits if e < num_early]
        manifest = {
            "format": FORMAT,
            "model_id": model_id,
            "tier": plan.tier,
            "tier_index": plan.index,
            "tiers": list(tiers),
            "model": spec.to_dict(),
            "segment": _plan_dict(plan, spec, split),
            "gates": [gate_to_dict(gates[e]) for e in early] + [{"kind": "always"}] * (len(plan.exits) - len(early)),
            "policy": active if early else "final",
            "policies": {n: [gate_to_dict(gs[e]) for e in early] for n, gs in policies.items()} if early else {},
            "calibration": dict(calibration or {}) if early else {},
            "history": history,
            "link": None if plan.is_last or wires is None else wire_to_dict(wires[plan.index]),
            "input": {
                "shape": list(x_in.shape[1:]),
                "dtype": str(x_in.dtype).removeprefix("torch."),
                "normalization": {"mean": list(spec.mean), "std": list(spec.std)} if plan.index == 0 else None,
            },
            "output_shape": list(out_shape),
            "class_names": list(class_names),
            "flops": {"blocks": list(flops.blocks), "heads": list(flops.heads), "send": flops.send,
                      "full_network": full_flops},
            "weights": {"file": WEIGHTS, "sha256": sha256_file(folder / WEIGHTS)},
        }
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return folders


class _Backbone(torch.nn.Module):
    """The whole network without exit heads: what ``full_network`` FLOPs count."""

    def __init__(self, model: MultiExitNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.final_logits(images)


def export(checkpoint_path: Path, out: Path, gate_specs: list[str] | None = None, split=None) -> list[Path]:
    """Write the bundles of a checkpoint: its active policy's gates (or ``gate_specs``) plus every stored policy;
    ``split`` as in ``export_bundles``."""
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
                          calibration={} if gate_specs else meta.get("calibration"), split=split)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint.safetensors written by training.train")
    p.add_argument("--out", type=Path, required=True, help="bundle root to write")
    p.add_argument("--gate", action="append", default=None, help="gate override per early exit (repeatable)")
    p.add_argument("--split", type=exit_list, default=None, metavar="I,J",
                   help="the last exit of the device and of the edge tier (early exits count from 0); default: the "
                        "early exits spread evenly, e.g. 1,3 for four")
    add_plugin_arg(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    use_plugins(args.plugin)
    for folder in export(args.checkpoint, args.out, args.gate, args.split):
        print(folder)
    return 0


def cli() -> None:
    run(main)


if __name__ == "__main__":
    cli()
