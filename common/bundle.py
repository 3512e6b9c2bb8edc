"""Per-tier deployment bundles: ``<root>/<tier>/manifest.json`` + that tier's weights only (safetensors).

A bundle is everything one tier process needs and nothing more: the model structure (to rebuild its segment),
which stages and exit it holds, its gate, the input it accepts, FLOPs, class names, and its own weights. Weights are
safetensors files, so loading a bundle never unpickles anything. All tiers of one export share a ``model_id``
derived from the model spec and every tier's weights; a tier refuses requests carrying another id.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.errors import ConfigError
from common.flops import count_flops
from common.gates import POLICY_NAMES, Gate, gate_from_dict, gate_to_dict
from common.models import ModelSpec, MultiExitNet
from common.runtime import TierSpec
from common.split import TIER_NAMES, Segment, SegmentPlan, build_segment, plan_segments, segment_flops
from common.tensor_codecs import WireCodec, wire_from_dict, wire_to_dict

FORMAT = "splitexit-bundle/1"
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"


@dataclass
class TierBundle:
    """A loaded tier: its manifest, its segment (with weights) and its gate."""

    manifest: dict
    segment: Segment
    gate: Gate

    def policy_gate(self, name: str) -> Gate:
        """The gate of stored policy ``name`` for this tier's exit."""
        if name not in POLICY_NAMES:
            raise ConfigError(f"unknown policy {name!r}; policies are {', '.join(POLICY_NAMES)}")
        stored = self.manifest.get("policies") or {}
        if self.manifest["tier_index"] == len(self.manifest["tiers"]) - 1:
            return self.gate  # the last tier always answers, whatever the policy
        if name not in stored:
            raise ConfigError(f"the {self.tier} bundle has no policy {name!r}; it has: {', '.join(stored) or 'none'}")
        return gate_from_dict(stored[name])

    def served_policy(self, policy: str | None = None, overridden: bool = False) -> tuple[str, dict]:
        """The name of the policy this tier serves and how its thresholds were calibrated: ``policy`` or the active
        one; ``("command-line", {})`` when a gate override replaces it; no record on the last tier."""
        if overridden:
            return "command-line", {}
        name = policy or self.manifest.get("policy") or ""
        last = self.manifest["tier_index"] == len(self.manifest["tiers"]) - 1
        return name, {} if last else self.calibration(name)

    def calibration(self, policy: str | None = None) -> dict:
        """How the thresholds of ``policy`` (default: the active one) were calibrated; empty when unknown."""
        return dict((self.manifest.get("calibration") or {}).get(policy or self.manifest.get("policy"), {}))

    def link_codec(self) -> WireCodec:
        """The codec this tier's outgoing link uses unless told otherwise (float32 when the bundle names none)."""
        return wire_from_dict(self.manifest.get("link"))

    @property
    def tier(self) -> str:
        return self.manifest["tier"]

    @property
    def model_id(self) -> str:
        return self.manifest["model_id"]

    def tier_spec(self, max_batch: int = 512) -> TierSpec:
        m = self.manifest
        return TierSpec(
            tier=m["tier"], model_id=m["model_id"], exit_index=m["segment"]["exit_index"],
            input_shape=tuple(m["input"]["shape"]), input_dtype=getattr(torch, m["input"]["dtype"]),
            flops_per_sample=float(m["flops"]["segment"] + m["flops"]["head"]),
            is_last=m["tier_index"] == len(m["tiers"]) - 1, max_batch=max_batch,
        )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _plan_dict(plan: SegmentPlan, spec: ModelSpec) -> dict:
    return {
        "start": plan.start, "end": plan.end, "stages": list(plan.stage_names), "exit_index": plan.exit_index,
        "exit_head": "final" if plan.is_last else spec.exit_head.to_dict(),
    }


def export_bundles(
    model: MultiExitNet, gates: list[Gate], out: Path, class_names: list[str], tiers: tuple[str, ...] = TIER_NAMES,
    policies: dict[str, list[Gate]] | None = None, active: str | None = None,
    calibration: dict[str, dict] | None = None, wires: list[WireCodec] | None = None,
) -> list[Path]:
    """Write one bundle folder per tier under ``out``; ``gates[i]`` guards tier i's exit (the last is ignored).

    ``policies`` (name -> one gate per early exit) are stored too, so a tier can switch policy at start-up
    (``--policy NAME``) without retraining; ``active`` names the policy ``gates`` came from. ``calibration``
    (policy name -> how its thresholds were chosen: method, objective, target, delta, ...) goes with the early tiers.
    ``wires[i]`` is the codec tier i's outgoing link uses by default (a planner's choice; float32 if not given).
    """
    spec = model.spec
    plans = plan_segments(spec, model.backbone.stage_names, tiers)
    policies = policies or {}
    if wires is not None and len(wires) != len(plans) - 1:
        raise ConfigError(f"need one link codec for each of the {len(plans) - 1} links, got {len(wires)}")
    for name, gs in {"gates": gates, **policies}.items():
        if len(gs) != len(plans) - 1:
            raise ConfigError(f"{name}: need one gate for each of the {len(plans) - 1} early exits, got {len(gs)}")
    model = model.eval()
    x = torch.zeros((1, *spec.input_shape), dtype=torch.uint8)
    # Counted on the whole network, independently of the split: the per-tier figures must add up to it (tested).
    full_flops = count_flops(_Backbone(model), x)
    parts = []  # (plan, segment, example input, stage FLOPs, head FLOPs, output shape)
    for plan, (stage_flops, head_flops) in zip(plans, segment_flops(model, tiers)):
        segment = build_segment(model, plan).eval()
        with torch.no_grad():
            features, _ = segment(x)
        parts.append((plan, segment, x, stage_flops, head_flops, tuple(features.shape[1:])))
        x = features
    digest = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode())
    folders = []
    for plan, segment, *_ in parts:
        folder = out / plan.tier
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().clone() for k, v in segment.state_dict().items()}, str(folder / WEIGHTS))
        digest.update(_sha256(folder / WEIGHTS).encode())
        folders.append(folder)
    model_id = f"{spec.architecture}-{digest.hexdigest()[:16]}"
    for (plan, _, x_in, seg_flops, head_flops, out_shape), folder in zip(parts, folders):
        gate = gate_from_dict({"kind": "always"}) if plan.is_last else gates[plan.index]
        manifest = {
            "format": FORMAT,
            "model_id": model_id,
            "tier": plan.tier,
            "tier_index": plan.index,
            "tiers": list(tiers),
            "model": spec.to_dict(),
            "segment": _plan_dict(plan, spec),
            "gate": gate_to_dict(gate),
            "policy": active if not plan.is_last else "final",
            "policies": {} if plan.is_last else {n: gate_to_dict(gs[plan.index]) for n, gs in policies.items()},
            "calibration": {} if plan.is_last else dict(calibration or {}),
            "link": None if plan.is_last or wires is None else wire_to_dict(wires[plan.index]),
            "input": {
                "shape": list(x_in.shape[1:]),
                "dtype": str(x_in.dtype).removeprefix("torch."),
                "normalization": {"mean": list(spec.mean), "std": list(spec.std)} if plan.index == 0 else None,
            },
            "output_shape": list(out_shape),
            "class_names": list(class_names),
            "flops": {"segment": seg_flops, "head": head_flops, "full_network": full_flops},
            "weights": {"file": WEIGHTS, "sha256": _sha256(folder / WEIGHTS)},
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


def read_manifest(folder: Path) -> dict:
    """Read and validate ``folder/manifest.json``; any problem is a ``ConfigError`` naming the file."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ConfigError(f"{folder} is not a tier bundle: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ConfigError(f"{path} has format {got!r}; this build reads {FORMAT!r}")
    _check_manifest(manifest, path)
    return manifest


_REQUIRED = {
    "model_id": str, "tier": str, "tier_index": int, "tiers": list, "model": dict, "segment": dict, "gate": dict,
    "input": dict, "output_shape": list, "class_names": list, "flops": dict, "weights": dict,
}


def _check_manifest(m: dict, path: Path) -> None:
    """Refuse a manifest with missing or mistyped fields, so loading fails with a message, not a KeyError."""
    for key, kind in _REQUIRED.items():
        if not isinstance(m.get(key), kind):
            raise ConfigError(f"{path}: field {key!r} is missing or not a {kind.__name__}")
    if not 0 <= m["tier_index"] < len(m["tiers"]) or m["tiers"][m["tier_index"]] != m["tier"]:
        raise ConfigError(f"{path}: tier {m['tier']!r} / tier_index {m['tier_index']} disagree with tiers {m['tiers']}")
    weights = m["weights"].get("file")
    if not isinstance(weights, str) or Path(weights).name != weights or weights in ("", ".", ".."):
        raise ConfigError(f"{path}: weights file must be a plain file name inside the bundle, got {weights!r}")
    for key in ("segment", "head", "full_network"):
        if not isinstance(m["flops"].get(key), (int, float)):
            raise ConfigError(f"{path}: flops.{key} is missing")
    for key in ("shape", "dtype"):
        if key not in m["input"]:
            raise ConfigError(f"{path}: input.{key} is missing")
    if m["input"]["dtype"] not in ("uint8", "float32"):
        raise ConfigError(f"{path}: input dtype {m['input']['dtype']!r} is not one a tier accepts")
    policies = m.get("policies", {})
    if not isinstance(policies, dict) or not all(isinstance(g, dict) for g in policies.values()):
        raise ConfigError(f"{path}: policies must map policy names to gate objects")
    calibration = m.get("calibration", {})
    if not isinstance(calibration, dict) or not all(isinstance(c, dict) for c in calibration.values()):
        raise ConfigError(f"{path}: calibration must map policy names to objects")
    if m.get("link") is not None:
        if not isinstance(m["link"], dict):
            raise ConfigError(f"{path}: link must be an object naming the outgoing link's codec")
        wire_from_dict(m["link"])
    if "exit_index" not in m["segment"]:
        raise ConfigError(f"{path}: segment.exit_index is missing")


def load_tier_bundle(folder: Path) -> TierBundle:
    """Rebuild only this tier's segment and load its weights (safetensors; checksum verified)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    weights = folder / manifest["weights"]["file"]
    if not weights.is_file():
        raise ConfigError(f"{weights} is missing")
    if _sha256(weights) != manifest["weights"]["sha256"]:
        raise ConfigError(f"{weights} does not match the checksum in its manifest")
    spec = ModelSpec.from_dict(manifest["model"])
    # Build the structure on the meta device: no memory is spent on the other tiers' layers.
    with torch.device("meta"):
        skeleton = MultiExitNet(spec)
    plans = plan_segments(spec, skeleton.backbone.stage_names, tuple(manifest["tiers"]))
    plan = plans[manifest["tier_index"]]
    segment = build_segment(skeleton, plan).to_empty(device="cpu")
    segment.load_state_dict(load_file(str(weights)), strict=True)
    return TierBundle(manifest, segment.eval(), gate_from_dict(manifest["gate"]))


def find_tier_folders(root: Path) -> list[Path]:
    """The tier folders of an exported bundle root, in deployment order."""
    root = Path(root)
    first = read_manifest(root / TIER_NAMES[0]) if (root / TIER_NAMES[0]).is_dir() else None
    tiers = first["tiers"] if first else None
    if not tiers:
        raise ConfigError(f"{root} holds no exported bundle (expected {root}/{TIER_NAMES[0]}/{MANIFEST})")
    return [root / t for t in tiers]
