"""Reading per-tier deployment bundles: ``<root>/<tier>/manifest.json`` + that tier's weights only (safetensors).

A bundle is everything one tier process needs and nothing more: the model structure (to rebuild its segment),
which stages and exits it holds, their gates, the input it accepts, FLOPs, class names, and its own weights. Weights are
safetensors files, so loading a bundle never unpickles anything. All tiers of one export share a ``model_id``
derived from the model spec and every tier's weights; a tier refuses requests carrying another id.

The manifest is read once into a typed ``Manifest``; the rules every consumer must agree on (is this the last tier,
which gate and which link codec a tier serves) are decided here, once. Bundles are written by ``training.export``.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from common.errors import ConfigError
from common.model import ModelSpec, MultiExitNet
from common.model.gates import POLICY_NAMES, ConstantGate, Gate, gate_from_dict, parse_gate
from common.model.split import TIER_NAMES, Segment, build_segment, is_last_tier, plan_segments
from common.wire.codecs import FLOAT32, WireCodec, wire_from_dict
from common.wire.tensors import DTYPES

FORMAT = "splitexit-bundle/2"
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
INPUT_DTYPES = ("uint8", "float32")


@dataclass(frozen=True)
class Manifest:
    """A tier bundle's ``manifest.json``, validated and typed. ``raw`` keeps the JSON object as read."""

    model_id: str
    tier: str
    tier_index: int
    tiers: tuple[str, ...]
    model: dict  # ModelSpec.to_dict()
    stages: tuple[str, ...]
    split: tuple[int, ...]  # the last exit of each tier but the last (``common.model.split``)
    exits: tuple[int, ...]  # the model's exits this tier holds, earliest first
    exit_heads: tuple[dict | str, ...]  # each exit's head spec, "final" for the final classifier
    gates: tuple[dict, ...]  # one per exit
    policy: str
    policies: dict[str, list[dict]]  # policy name -> one gate per early exit of this tier
    calibration: dict[str, dict]
    history: bool  # requests between tiers carry the earlier exits' logits
    link: WireCodec | None  # the outgoing link's codec a planner chose; None = not named
    input_shape: tuple[int, ...]  # per sample
    input_dtype: str
    normalization: dict | None
    output_shape: tuple[int, ...]  # per sample
    class_names: tuple[str, ...]
    block_flops: tuple[float, ...]  # per exit: its block of stages
    exit_head_flops: tuple[float, ...]  # per exit: its head
    send_flops: float  # encoding a forwarded sample
    full_network_flops: float
    weights_file: str
    weights_sha256: str
    raw: dict

    @property
    def exit_index(self) -> int:
        return self.exits[-1]

    @property
    def exit_head(self) -> dict | str:
        return self.exit_heads[-1]

    @property
    def num_early(self) -> int:
        """How many of the tier's exits are early exits (gated; the final classifier is not)."""
        return len(self.exits) - (1 if self.is_last else 0)

    @property
    def exit_flops(self) -> tuple[float, ...]:
        """Per exit: what a sample reaching it pays for it (its block of stages and its head)."""
        return tuple(b + h for b, h in zip(self.block_flops, self.exit_head_flops))

    @property
    def segment_flops(self) -> float:
        """Every stage of the segment and the encoding of what it sends, per sample."""
        return sum(self.block_flops) + self.send_flops

    @property
    def head_flops(self) -> float:
        """Every exit head of the segment, per sample."""
        return sum(self.exit_head_flops)

    @property
    def is_last(self) -> bool:
        return is_last_tier(self.tier_index, self.tiers)

    @property
    def architecture(self) -> str:
        return self.model["architecture"]

    @property
    def input_bytes_per_sample(self) -> int:
        return torch.empty((), dtype=DTYPES[self.input_dtype][0]).element_size() * math.prod(self.input_shape)

    @property
    def output_bytes_per_sample(self) -> int:
        return 4 * math.prod(self.output_shape)  # features leave a segment as float32

    def link_codec(self, override: WireCodec | None = None) -> WireCodec:
        """The codec of this tier's outgoing link: ``override`` (a command-line choice), else the one the bundle
        names, else float32 (exact)."""
        return override or self.link or FLOAT32

    @classmethod
    def from_dict(cls, m: dict, path: Path | str = MANIFEST) -> "Manifest":
        """Validate ``m`` (a parsed manifest.json); any problem is a ``ConfigError`` naming ``path``."""
        _check_manifest(m, Path(path))
        seg, inp, flops = m["segment"], m["input"], m["flops"]
        return cls(
            model_id=m["model_id"], tier=m["tier"], tier_index=m["tier_index"], tiers=tuple(m["tiers"]),
            model=m["model"], stages=tuple(seg.get("stages", ())), split=tuple(seg["split"]),
            exits=tuple(e["index"] for e in seg["exits"]), exit_heads=tuple(e["head"] for e in seg["exits"]),
            gates=tuple(m["gates"]), policy=m.get("policy") or "",
            policies={k: list(v) for k, v in (m.get("policies") or {}).items()},
            calibration=dict(m.get("calibration") or {}), history=bool(m.get("history", False)),
            link=wire_from_dict(m["link"]) if m.get("link") is not None else None,
            input_shape=tuple(inp["shape"]), input_dtype=inp["dtype"], normalization=inp.get("normalization"),
            output_shape=tuple(m["output_shape"]), class_names=tuple(m["class_names"]),
            block_flops=tuple(float(f) for f in flops["blocks"]), exit_head_flops=tuple(float(f) for f in flops["heads"]),
            send_flops=float(flops["send"]), full_network_flops=float(flops["full_network"]),
            weights_file=m["weights"]["file"], weights_sha256=m["weights"].get("sha256", ""), raw=m,
        )


@dataclass
class TierBundle:
    """A loaded tier: its manifest, its segment (with weights) and the gate of each of its exits."""

    manifest: Manifest
    segment: Segment
    gates: list[Gate]

    @property
    def tier(self) -> str:
        return self.manifest.tier

    @property
    def model_id(self) -> str:
        return self.manifest.model_id

    @property
    def early_gates(self) -> list[Gate]:
        """The active gates of the tier's early exits."""
        return self.gates[:self.manifest.num_early]

    def policy_gates(self, name: str) -> list[Gate]:
        """The gates of stored policy ``name`` for this tier's early exits (none on a last tier holding only the
        final classifier)."""
        if name not in POLICY_NAMES:
            raise ConfigError(f"unknown policy {name!r}; policies are {', '.join(POLICY_NAMES)}")
        if not self.manifest.num_early:
            return []
        stored = self.manifest.policies
        if name not in stored:
            raise ConfigError(f"the {self.tier} bundle has no policy {name!r}; it has: {', '.join(stored) or 'none'}")
        return [gate_from_dict(g) for g in stored[name]]

    def select_gates(self, override: Gate | str | list[Gate] | None = None, policy: str | None = None) -> list[Gate]:
        """The gate of each exit this tier serves. Precedence: explicit gates (a ``Gate`` or a spec such as
        ``confidence:0.9``, used at every early exit of the tier, or a list of one gate per exit) over a stored
        ``policy`` over the bundle's active gates. The final classifier always answers, whatever the tier is told."""
        if isinstance(override, (list, tuple)):
            if len(override) != len(self.manifest.exits):
                raise ConfigError(f"the {self.tier} tier holds {len(self.manifest.exits)} exits, got "
                                  f"{len(override)} gates")
            early = list(override[:self.manifest.num_early])
        elif override is not None:
            gate = parse_gate(override) if isinstance(override, str) else override
            early = [gate] * self.manifest.num_early
        else:
            early = self.policy_gates(policy) if policy else self.early_gates
        return early + [ConstantGate(True)] * (len(self.manifest.exits) - len(early))

    def served_policy(self, policy: str | None = None, overridden: bool = False) -> tuple[str, dict]:
        """The name of the policy this tier serves and how its thresholds were calibrated: ``policy`` or the active
        one; ``("command-line", {})`` when a gate override replaces it; no record on the last tier."""
        if overridden:
            return "command-line", {}
        name = policy or self.manifest.policy
        return name, {} if self.manifest.is_last else self.calibration(name)

    def calibration(self, policy: str | None = None) -> dict:
        """How the thresholds of ``policy`` (default: the active one) were calibrated; empty when unknown."""
        return dict(self.manifest.calibration.get(policy or self.manifest.policy, {}))

    def link_codec(self, override: WireCodec | None = None) -> WireCodec:
        """See ``Manifest.link_codec``."""
        return self.manifest.link_codec(override)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(folder: Path) -> Manifest:
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
    return Manifest.from_dict(manifest, path)


_REQUIRED = {
    "model_id": str, "tier": str, "tier_index": int, "tiers": list, "model": dict, "segment": dict, "gates": list,
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
    exits = m["segment"].get("exits")
    if not isinstance(exits, list) or not exits or not all(
            isinstance(e, dict) and isinstance(e.get("index"), int) and "head" in e for e in exits):
        raise ConfigError(f"{path}: segment.exits must list the tier's exits, each with its index and head")
    if not isinstance(m["segment"].get("split"), list):
        raise ConfigError(f"{path}: segment.split is missing")
    if len(m["gates"]) != len(exits) or not all(isinstance(g, dict) for g in m["gates"]):
        raise ConfigError(f"{path}: gates must hold one gate object per exit ({len(exits)})")
    for key in ("full_network", "send"):
        if not isinstance(m["flops"].get(key), (int, float)):
            raise ConfigError(f"{path}: flops.{key} is missing")
    for key in ("blocks", "heads"):
        if not isinstance(m["flops"].get(key), list) or len(m["flops"][key]) != len(exits):
            raise ConfigError(f"{path}: flops.{key} must hold one number per exit")
    for key in ("shape", "dtype"):
        if key not in m["input"]:
            raise ConfigError(f"{path}: input.{key} is missing")
    if m["input"]["dtype"] not in INPUT_DTYPES:
        raise ConfigError(f"{path}: input dtype {m['input']['dtype']!r} is not one a tier accepts")
    policies = m.get("policies", {})
    if not isinstance(policies, dict) or not all(
            isinstance(gs, list) and all(isinstance(g, dict) for g in gs) for gs in policies.values()):
        raise ConfigError(f"{path}: policies must map policy names to lists of gate objects")
    calibration = m.get("calibration", {})
    if not isinstance(calibration, dict) or not all(isinstance(c, dict) for c in calibration.values()):
        raise ConfigError(f"{path}: calibration must map policy names to objects")
    if m.get("link") is not None:
        if not isinstance(m["link"], dict):
            raise ConfigError(f"{path}: link must be an object naming the outgoing link's codec")
        wire_from_dict(m["link"])


def load_tier_bundle(folder: Path) -> TierBundle:
    """Rebuild only this tier's segment and load its weights (safetensors; checksum verified)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    weights = folder / manifest.weights_file
    if not weights.is_file():
        raise ConfigError(f"{weights} is missing")
    if sha256_file(weights) != manifest.weights_sha256:
        raise ConfigError(f"{weights} does not match the checksum in its manifest")
    spec = ModelSpec.from_dict(manifest.model)
    # Build the structure on the meta device: no memory is spent on the other tiers' layers.
    with torch.device("meta"):
        skeleton = MultiExitNet(spec)
    plan = plan_segments(spec, skeleton.backbone.stage_names, manifest.tiers, manifest.split)[manifest.tier_index]
    if plan.exits != manifest.exits:
        raise ConfigError(f"{folder}: the manifest lists exits {list(manifest.exits)}, its split gives "
                          f"{list(plan.exits)}")
    segment = build_segment(skeleton, plan).to_empty(device="cpu")
    segment.load_state_dict(load_file(str(weights)), strict=True)
    return TierBundle(manifest, segment.eval(), [gate_from_dict(g) for g in manifest.gates])


def find_tier_folders(root: Path) -> list[Path]:
    """The tier folders of an exported bundle root, in deployment order."""
    root = Path(root)
    first = read_manifest(root / TIER_NAMES[0]) if (root / TIER_NAMES[0]).is_dir() else None
    if first is None or not first.tiers:
        raise ConfigError(f"{root} holds no exported bundle (expected {root}/{TIER_NAMES[0]}/{MANIFEST})")
    return [root / t for t in first.tiers]


def bundle_folder(path: Path, tier: str) -> Path:
    """``path/tier`` when ``path`` is an export root holding that tier, else ``path`` itself (a tier folder)."""
    path = Path(path)
    return path / tier if (path / tier / MANIFEST).is_file() else path
