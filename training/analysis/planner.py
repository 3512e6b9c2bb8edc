"""The split planner: for a trained checkpoint, a link and a compute profile, predict what every way of deploying it
would cost and deliver, and rank the candidates.

Candidates are every split of the checkpoint's early exits over the tiers - the device holds the exits up to one of
them, the edge up to a later one, the cloud the rest (with a learned bottleneck, the device ends at the bottleneck's
exit) - every link codec on each of the two links (element codec and
lossless compression), with early exits on - the thresholds of ``policy`` calibrated on validation so that accuracy
stays within ``target_drop`` points of the float32 network - or off. Two deployments without a split are predicted
next to them: the whole network on the device, and the raw image offloaded to the cloud.

Where each predicted figure comes from:

- accuracy, exits and FLOPs: the exit logits of the evaluation data, cached under each combination of element
  codecs with the real encode/decode on the links, and thresholds calibrated on the validation split exactly as
  training calibrates them (the fit half orders candidates, the calibration half certifies them);
- bytes: real requests of each link codec, built from real features at several batch sizes;
- latency: ``common.emulation.cost_model`` over compute and codec times measured in this process at several batch sizes,
  stretched by the compute profile, plus the link model and a per-call RPC overhead.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from common.wire import messages, codecs
from common.emulation.baselines import whole_network_runtime
from common.model.bundle import TierBundle, load_tier_bundle
from training.export import export_bundles
from common.wire.tensors import TensorLimits
from common.emulation.cost_model import ZERO, Curve, LinkCost, TierCost, predict_run
from common.errors import ConfigError
from common.model.gates import ConstantGate, Gate, gate_from_dict
from common.wire.link import LinkModel
from common.emulation.chain import bundle_costs
from common.model import MultiExitNet
from common.wire.batch import Batch
from common.serving.runtime import TierRuntime, TierSpec
from common.model.split import TIER_NAMES
from common.wire.codecs import COMPRESSIONS, ELEMENT_CODECS, FLOAT32, WireCodec
from training.calibrate import ExitScores, Objective, Thresholdable, calibrate_scores, policy_family
from training.policies import gate_split
from training.risk import pvalue

_NO_LIMITS = TensorLimits(max_elements=1 << 34, max_decoded_bytes=1 << 40)


@dataclass(frozen=True)
class Settings:
    """What the planner plans for and how hard it measures."""

    link: LinkModel | None = None  # every link of the deployment (None: loopback)
    scales: tuple[float, ...] = (1.0, 1.0, 1.0)  # compute profile, one stretch factor per tier
    batch_size: int = 64
    target_drop: float = 1.0  # points below the float32 network's accuracy
    policy: str = "confidence"
    method: str = "ltt"
    delta: float = 0.1
    bound: str = "wsr"
    codecs: tuple[str, ...] = ("float32", "float16", "int8")
    compressions: tuple[str, ...] = ("", "zlib")
    overhead_ms: float = 3.0  # per RPC call, beyond encoding and the link
    reps: int = 5  # timings per batch size (the median is kept)
    seed: int = 0  # the training seed: it fixes the validation split's fit / calibration halves

    def __post_init__(self) -> None:
        unknown = set(self.codecs) - set(ELEMENT_CODECS) or set(self.compressions) - set(COMPRESSIONS)
        if unknown:
            raise ConfigError(f"unknown codec or compression {sorted(unknown)}")
        if "float32" not in self.codecs:
            raise ConfigError("the planner needs float32 among its codecs: the exact network is the accuracy reference")
        if len(self.scales) != len(TIER_NAMES) or not all(s > 0 for s in self.scales):
            raise ConfigError(f"the compute profile needs one positive scale per tier, got {self.scales}")


def exit_splits(model: MultiExitNet) -> list[tuple[int, int]]:
    """Every split of the model's early exits over device and edge: ``(i, j)``, the device holds exits 0..i, the
    edge i+1..j, the cloud the rest and the final classifier (with a learned bottleneck the device ends at exit 0,
    where the bottleneck sits)."""
    n = len(model.exits)
    firsts = [0] if model.bottleneck_encoder is not None else range(n)
    return [(i, j) for i in firsts for j in range(i + 1, n)]


def stored_family(meta: dict, policy: str, num_early: int) -> list[Thresholdable]:
    """The thresholdable form of ``policy`` at every early exit; learned policies use the checkpoint's gates."""
    stored = (meta.get("policies") or {}).get(policy)
    templates = [gate_from_dict(g) for g in stored] if stored else None
    return policy_family(policy, templates, num_early)


def export_split(model: MultiExitNet, meta: dict, split: tuple[int, int], out: Path, gates: list[Gate] | None = None,
                 policy: str = "planner", calibration: dict | None = None,
                 wires: list[WireCodec] | None = None) -> list[TierBundle]:
    """Write the three tier bundles of ``model`` split at ``split`` and load them back."""
    gates = gates or [ConstantGate(False)] * len(model.exits)
    folders = export_bundles(model, gates, out, meta["class_names"], policies={policy: gates},
                             active=policy, calibration={policy: calibration or {}}, wires=wires, split=split)
    return [load_tier_bundle(f) for f in folders]


def roundtrip(x: torch.Tensor, wire: WireCodec) -> torch.Tensor:
    """What the receiving tier sees of ``x`` after ``wire``'s encode and decode."""
    if wire == FLOAT32:
        return x
    return codecs.decode(codecs.encode(x, wire), _NO_LIMITS)


@torch.inference_mode()
def cached_logits(bundles: list[TierBundle], images: torch.Tensor, codecs: tuple[str, ...],
                  batch_size: int) -> dict[tuple[str, str], list[torch.Tensor]]:
    """Every exit's logits over ``images`` for each pair of element codecs on the two links, in batches of
    ``batch_size`` as a client sends them (int8 scales are per request). Where the deployment carries the earlier
    exits' logits, they cross the links through the same codecs."""
    device, edge, cloud = (b.segment for b in bundles)
    carried = bundles[0].manifest.history
    chunks: dict[tuple[str, str], list[list[torch.Tensor]]] = {(a, b): [] for a in codecs for b in codecs}
    for lo in range(0, len(images), batch_size):
        sent, first = device(images[lo:lo + batch_size])
        for a in codecs:
            previous = roundtrip(torch.stack(first, 1), WireCodec(a))[:, -1] if carried else None
            sent2, second = edge(roundtrip(sent, WireCodec(a)), previous)
            history = torch.stack(first + second, 1) if carried else None
            for b in codecs:
                previous = roundtrip(history, WireCodec(b))[:, -1] if carried else None
                _, final = cloud(roundtrip(sent2, WireCodec(b)), previous)
                chunks[a, b].append(first + second + final)
    return {key: [torch.cat([c[e] for c in parts]) for e in range(len(parts[0]))] for key, parts in chunks.items()}


def one_batch(images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``batch_size`` images to time things on: the first ones, repeated if there are fewer."""
    return images[torch.arange(batch_size) % len(images)]


def batch_sizes(batch_size: int) -> list[int]:
    """1, 4, 16, ... below ``batch_size``, and ``batch_size``: where compute and codec times are measured."""
    sizes, n = [], 1
    while n < batch_size:
        sizes.append(n)
        n *= 4
    return sizes + [batch_size]


def median_seconds(fn, reps: int, budget_s: float = 1.0) -> float:
    """Median wall time of ``fn`` over ``reps`` calls after a warm-up call (fewer, but at least 3, when the calls
    add up to more than ``budget_s``)."""
    fn()  # warm: first calls pay for lazy initialisation
    times: list[float] = []
    while len(times) < reps and (len(times) < 3 or sum(times) < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def time_runtime(runtime: TierRuntime, inputs: torch.Tensor, sizes: list[int], reps: int) -> Curve:
    """Seconds ``runtime``'s tier needs to answer ``n`` samples of ``inputs`` itself: validation, its compute
    window and the bookkeeping of its answers (its gate and next tier are left out)."""
    spec = replace(runtime.spec, is_last=True)
    alone = TierRuntime(spec, runtime.segment, _all_exits(spec))
    values = []
    for n in sizes:
        batch = Batch("plan", spec.model_id, list(range(n)), inputs[:n])
        values.append(median_seconds(lambda: alone.process(batch), reps))
    return Curve(tuple(float(s) for s in sizes), tuple(values))


@torch.inference_mode()
def tier_inputs(bundles: list[TierBundle], images: torch.Tensor) -> list[torch.Tensor]:
    """What each tier receives when every sample goes all the way (float32 links)."""
    out, x = [], images
    for bundle in bundles:
        out.append(x)
        x = bundle.segment.body(x)
    return out


def link_profile(tensor: torch.Tensor, wire: WireCodec, model_id: str, sizes: list[int],
                 reps: int) -> tuple[Curve, Curve]:
    """(request bytes, seconds to encode + serialize + parse + decode) for ``n`` rows of ``tensor`` under ``wire``."""
    nbytes, seconds = [], []
    for n in sizes:
        batch = Batch("plan-000000", model_id, list(range(10_000, 10_000 + n)), tensor[:n])

        def exchange() -> None:
            wire_bytes = messages.encode_request(batch, wire)
            codecs.decode(messages.pb.InferRequest.FromString(wire_bytes).tensor, _NO_LIMITS)

        nbytes.append(float(len(messages.encode_request(batch, wire))))
        seconds.append(median_seconds(exchange, reps))
    xs = tuple(float(s) for s in sizes)
    return Curve(xs, tuple(nbytes)), Curve(xs, tuple(seconds))


@dataclass
class Candidate:
    """One way of deploying the model, its calibration and its prediction."""

    name: str
    kind: str  # "split", "device_only" or "cloud_offload"
    feasible: bool
    predicted: dict
    split: tuple[int, int] | None = None
    codecs: tuple[WireCodec, WireCodec] | None = None
    early_exits: bool = False
    thresholds: list[float | None] | None = None
    calibration: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "feasible": self.feasible,
                "split": list(self.split) if self.split else None,
                "codecs": [str(w) for w in self.codecs] if self.codecs else None,
                "early_exits": self.early_exits, "thresholds": self.thresholds, "calibration": self.calibration,
                "predicted": self.predicted}


def holds(es: ExitScores, thresholds: list[float | None], objective: Objective, s: Settings) -> bool:
    """Whether fixed thresholds keep the objective on ``es``: certified at level delta (ltt) or met (naive)."""
    if s.method == "naive":
        return objective.met(es.outcome(thresholds), float(es.reference_correct().mean()))
    losses, limit = objective.losses(es, thresholds)
    return limit >= 1 or pvalue(losses, limit, s.bound, s.delta) <= s.delta


def outcome(es: ExitScores, thresholds: list[float | None]) -> dict:
    """Accuracy, drop against the reference (points), FLOPs fraction and exits per tier of fixed thresholds."""
    o = es.outcome(thresholds)
    return {"accuracy": o["accuracy"], "drop_points": o["drop"], "flops_fraction": o["flops_fraction"],
            "exits": o["exit_counts"]}


@dataclass
class Measured:
    """One split's deployment as measured here: its bundles and the cost model's pieces."""

    bundles: list[TierBundle]
    tiers: list[TierCost]
    entry: LinkCost  # the client's call into the device tier
    links: list[dict[WireCodec, tuple[Curve, Curve]]]  # per link: codec -> (request bytes, codec seconds)
    costs: list[float]  # FLOPs of leaving at each exit
    full: float  # FLOPs of the whole network

    @property
    def link_names(self) -> list[str]:
        return [f"{a.tier}_to_{b.tier}" for a, b in zip(self.bundles, self.bundles[1:])]

    @property
    def exit_names(self) -> list[str]:
        """The stage each tier but the last ends at (its last exit's)."""
        return [b.manifest.stages[-1] for b in self.bundles[:-1]]

    @property
    def tier_of_exit(self) -> np.ndarray:
        """The tier (index) holding each exit of the model."""
        return np.asarray([k for k, b in enumerate(self.bundles) for _ in b.manifest.exits])

    def describe(self) -> dict:
        return {"compute_s": {b.tier: t.compute_s.to_dict() for b, t in zip(self.bundles, self.tiers)},
                "request_bytes": {name: {str(w): c[0].to_dict() for w, c in link.items()}
                                  for name, link in zip(self.link_names, self.links)}}


def measure(bundles: list[TierBundle], images: torch.Tensor, s: Settings) -> Measured:
    """Compute curves of every tier and bytes / codec curves of every link codec, on real inputs."""
    sizes = batch_sizes(s.batch_size)
    model_id = bundles[0].model_id
    inputs = tier_inputs(bundles, one_batch(images, s.batch_size))
    tiers = [TierCost(time_runtime(_runtime(b), x, sizes, s.reps), scale)
             for b, x, scale in zip(bundles, inputs, s.scales)]
    entry = LinkCost(ZERO, link_profile(inputs[0], FLOAT32, model_id, sizes, s.reps)[1], None, s.overhead_ms / 1e3)
    wires = [WireCodec(c, z) for c in s.codecs for z in s.compressions]
    links = [{w: link_profile(x, w, model_id, sizes, s.reps) for w in wires} for x in inputs[1:]]
    costs, full = bundle_costs(bundles)
    return Measured(bundles, tiers, entry, links, costs, full)


def calibrated(es_cal: ExitScores, es_fit: ExitScores, objective: Objective,
               s: Settings) -> list[tuple[bool, list | None, bool, dict]]:
    """``(early exits, thresholds, feasible, calibration record)`` without early exits and with calibrated ones."""
    never = [None] * len(es_cal.scores)
    out = [(False, never, holds(es_cal, never, objective, s), {})]
    try:
        thresholds, info = calibrate_scores(es_cal, objective, s.method, s.delta, s.bound, path=es_fit)
        out.append((True, thresholds, True, info))
    except ConfigError as e:
        out.append((True, None, False, {"infeasible": str(e)}))
    return out


def split_candidates(m: Measured, split: tuple[int, int], element_codecs: tuple[str, str], es_test: ExitScores,
                     variants, s: Settings) -> list[Candidate]:
    """Every compression on both links of one split and element codec pair, with and without early exits."""
    rows = []
    first, second = ([w for w in m.links[k] if w.name == c] for k, c in enumerate(element_codecs))
    where = " | ".join(m.exit_names)
    for early, thresholds, feasible, info in variants:
        common = outcome(es_test, thresholds) if thresholds is not None else {}
        exit_of = m.tier_of_exit[es_test.exit_of(thresholds)] if thresholds is not None else None
        for w1 in first:
            for w2 in second:
                predicted = dict(common)
                if exit_of is not None:
                    links = [LinkCost(*m.links[0][w1], s.link, s.overhead_ms / 1e3),
                             LinkCost(*m.links[1][w2], s.link, s.overhead_ms / 1e3)]
                    run = predict_run(exit_of, s.batch_size, m.tiers, links, m.entry)
                    predicted.update(_named(run, [b.tier for b in m.bundles], m.link_names))
                name = f"split after {where}, {w1} | {w2}, " + ("early exits" if early else "no early exit")
                rows.append(Candidate(name, "split", feasible, predicted, split, (w1, w2), early, thresholds, info))
    return rows


def plan(model: MultiExitNet, meta: dict, val, test, s: Settings, log=print) -> dict:
    """Rank every candidate deployment of ``model`` on ``test`` (an ``ImageSet``), thresholds calibrated on ``val``.

    Returns ``{"candidates": [...], "chosen": index of the fastest feasible split, "reference_accuracy", "profile"}``
    with candidates sorted feasible first, then by predicted mean latency."""
    objective = Objective("drop", s.target_drop)
    fit, cal = (idx.numpy() for idx in gate_split(len(val), s.seed))
    rows: list[Candidate] = []
    profile: dict = {"batch_sizes": batch_sizes(s.batch_size)}
    reference: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="splitexit-plan-") as tmp:
        family = stored_family(meta, s.policy, len(model.exits))
        for split in exit_splits(model):
            t0 = time.perf_counter()
            bundles = export_split(model, meta, split, Path(tmp) / f"{split[0]}-{split[1]}")
            val_logits = cached_logits(bundles, val.images, s.codecs, s.batch_size)
            test_logits = cached_logits(bundles, test.images, s.codecs, s.batch_size)
            # The float32 network's final exit is the same whatever the split: the accuracy every drop is against.
            for key, logits, data in (("val", val_logits, val), ("test", test_logits, test)):
                reference.setdefault(key, logits["float32", "float32"][-1].argmax(1).numpy() == data.labels.numpy())
            m = measure(bundles, test.images, s)
            profile["split after " + " and ".join(m.exit_names)] = m.describe()
            for pair_codecs, logits in val_logits.items():
                es_val = _scores(logits, val.labels, reference["val"], family, m.costs, m.full)
                es_test = _scores(test_logits[pair_codecs], test.labels, reference["test"], family, m.costs, m.full)
                variants = calibrated(es_val.subset(cal), es_val.subset(fit), objective, s)
                rows += split_candidates(m, split, pair_codecs, es_test, variants, s)
            log(f"[plan] split after {' and '.join(m.exit_names)}: {len(val_logits)} codec pairs calibrated and "
                f"predicted in {time.perf_counter() - t0:.0f} s")
        rows += baselines(m.bundles, test, reference["test"], s, m.entry)
    rows.sort(key=lambda r: (not r.feasible, r.predicted.get("latency_ms_mean", float("inf"))))
    chosen = next((i for i, r in enumerate(rows) if r.feasible and r.kind == "split"), None)
    return {"candidates": rows, "chosen": chosen, "profile": profile,
            "reference_accuracy": {k: float(v.mean()) for k, v in reference.items()}}


def _all_exits(spec: TierSpec) -> list[Gate]:
    """Gates that run every exit of a tier on every sample and answer at its last."""
    return [ConstantGate(False)] * (len(spec.exits) - 1) + [ConstantGate(True)]


def _runtime(bundle: TierBundle) -> TierRuntime:
    spec = replace(TierSpec.from_manifest(bundle.manifest), is_last=True, history=False)
    return TierRuntime(spec, bundle.segment, _all_exits(spec))


def _scores(logits, labels, reference: np.ndarray, family, costs, full) -> ExitScores:
    """ExitScores of cached logits, drops measured against the float32 network's correctness."""
    return replace(ExitScores.build(logits, labels, family, costs, full), reference=reference)


def _named(run: dict, tiers: list[str], links: list[str]) -> dict:
    """A predicted run with its per-tier and per-link lists keyed by tier and link names."""
    out = {k: v for k, v in run.items() if k not in ("bytes_per_sample", "latency_parts_ms")}
    out["bytes_per_sample"] = dict(zip(links, run["bytes_per_sample"]))
    parts = dict(run["latency_parts_ms"])
    out["latency_parts_ms"] = {**{f"compute_{t}": c for t, c in zip(tiers, parts.pop("compute"))}, **parts}
    return out


def baselines(bundles: list[TierBundle], test, correct: np.ndarray, s: Settings, entry: LinkCost) -> list[Candidate]:
    """The whole network on the device, and the raw images offloaded to the cloud over the link."""
    accuracy = {"accuracy": float(correct.mean()), "drop_points": 0.0, "flops_fraction": 1.0}
    images = one_batch(test.images, s.batch_size)
    n, sizes, model_id = len(test), batch_sizes(s.batch_size), bundles[0].model_id
    first, last = bundles[0].tier, bundles[-1].tier
    device = time_runtime(whole_network_runtime(bundles, first), images, sizes, s.reps)
    run = predict_run(np.zeros(n, dtype=int), s.batch_size, [TierCost(device, s.scales[0])], [], entry)
    rows = [Candidate("device only: the whole network on the device", "device_only", True,
                      {**accuracy, **_named(run, [first], []), "exits": [n]})]
    cloud = time_runtime(whole_network_runtime(bundles, last), images, sizes, s.reps)
    raw = LinkCost(*link_profile(images, FLOAT32, model_id, sizes, s.reps), s.link, s.overhead_ms / 1e3)
    run = predict_run(np.ones(n, dtype=int), s.batch_size, [TierCost(ZERO), TierCost(cloud, s.scales[-1])], [raw],
                      entry)
    rows.append(Candidate("cloud offload: the raw uint8 image to the cloud", "cloud_offload", True,
                          {**accuracy, **_named(run, [first, last], [f"{first}_to_{last}"]), "exits": [0, n]}))
    return rows
