"""The split planner: for a trained checkpoint, a link and a compute profile, predict what every way of deploying it
would cost and deliver, and rank the candidates.

Candidates are every pair of the checkpoint's early exits as the device's and the edge's exits (with a learned
bottleneck, the device's exit is the bottleneck's), every link codec on each of the two links (element codec and
lossless compression), with early exits on - the thresholds of ``policy`` calibrated on validation so that accuracy
stays within ``target_drop`` points of the float32 network - or off. Two deployments without a split are predicted
next to them: the whole network on the device, and the raw image offloaded to the cloud.

Where each predicted figure comes from:

- accuracy, exits and FLOPs: the exit logits of the evaluation data, cached under each combination of element
  codecs with the real encode/decode on the links, and thresholds calibrated on the validation split exactly as
  training calibrates them (the fit half orders candidates, the calibration half certifies them);
- bytes: real requests of each link codec, built from real features at several batch sizes;
- latency: ``common.cost_model`` over compute and codec times measured in this process at several batch sizes,
  stretched by the compute profile, plus the link model and a per-call RPC overhead.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from common import messages, tensor_codecs
from common.baselines import whole_network_runtime
from common.bundle import TierBundle, export_bundles, load_tier_bundle
from common.codec import TensorLimits
from common.cost_model import ZERO, Curve, LinkCost, TierCost, predict_run
from common.errors import ConfigError
from common.gates import ConstantGate, Gate, gate_from_dict
from common.link import LinkModel
from common.local import bundle_costs
from common.models import MultiExitNet
from common.runtime import Batch, TierRuntime
from common.split import TIER_NAMES
from common.tensor_codecs import COMPRESSIONS, ELEMENT_CODECS, FLOAT32, WireCodec
from training.calibrate import ExitScores, Objective, Thresholdable, calibrate_scores, policy_family, to_gates
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
    overhead_ms: float = 1.0  # per RPC call, beyond encoding and the link
    reps: int = 5  # timings per batch size (the median is kept)
    seed: int = 0  # the training seed: it fixes the validation split's fit / calibration halves

    def __post_init__(self) -> None:
        unknown = set(self.codecs) - set(ELEMENT_CODECS) or set(self.compressions) - set(COMPRESSIONS)
        if unknown:
            raise ConfigError(f"unknown codec or compression {sorted(unknown)}")
        if len(self.scales) != len(TIER_NAMES) or not all(s > 0 for s in self.scales):
            raise ConfigError(f"the compute profile needs one positive scale per tier, got {self.scales}")


def exit_pairs(model: MultiExitNet) -> list[tuple[int, int]]:
    """Pairs of early exits (indices into ``model.exits``) that can be the device's and the edge's exits."""
    n = len(model.exits)
    firsts = [0] if model.bottleneck_encoder is not None else range(n)
    return [(i, j) for i in firsts for j in range(i + 1, n)]


def sub_model(model: MultiExitNet, pair: tuple[int, int]) -> MultiExitNet:
    """``model`` with only the early exits ``pair`` (weights copied), the shape a three-tier export takes."""
    if tuple(pair) == tuple(range(len(model.exits))):
        return model
    spec = replace(model.spec, exit_points=tuple(model.spec.exit_points[i] for i in pair))
    sub = MultiExitNet(spec)
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("exits."):
            old, rest = key.removeprefix("exits.").split(".", 1)
            if int(old) not in pair:
                continue
            key = f"exits.{pair.index(int(old))}.{rest}"
        state[key] = value
    sub.load_state_dict(state, strict=True)
    return sub.eval()


def stored_family(meta: dict, policy: str, pair: tuple[int, int]) -> list[Thresholdable]:
    """The thresholdable form of ``policy`` at the exits ``pair``; learned policies use the checkpoint's gates."""
    stored = (meta.get("policies") or {}).get(policy)
    templates = [gate_from_dict(stored[i]) for i in pair] if stored else None
    return policy_family(policy, templates, len(pair))


def export_split(model: MultiExitNet, meta: dict, pair: tuple[int, int], out: Path, gates: list[Gate] | None = None,
                 policy: str = "planner", calibration: dict | None = None,
                 wires: list[WireCodec] | None = None) -> list[TierBundle]:
    """Write the three tier bundles of ``model`` cut at the exits ``pair`` and load them back."""
    gates = gates or [ConstantGate(False)] * 2
    folders = export_bundles(sub_model(model, pair), gates, out, meta["class_names"], policies={policy: gates},
                             active=policy, calibration={policy: calibration or {}}, wires=wires)
    return [load_tier_bundle(f) for f in folders]


def roundtrip(x: torch.Tensor, wire: WireCodec) -> torch.Tensor:
    """What the receiving tier sees of ``x`` after ``wire``'s encode and decode."""
    if wire == FLOAT32:
        return x
    return tensor_codecs.decode(tensor_codecs.encode(x, wire), _NO_LIMITS)


@torch.inference_mode()
def cached_logits(bundles: list[TierBundle], images: torch.Tensor, codecs: tuple[str, ...],
                  batch_size: int) -> dict[tuple[str, str], list[torch.Tensor]]:
    """Every exit's logits over ``images`` for each pair of element codecs on the two links, in batches of
    ``batch_size`` as a client sends them (int8 scales are per request)."""
    device, edge, cloud = (b.segment for b in bundles)
    chunks: dict[tuple[str, str], list[list[torch.Tensor]]] = {(a, b): [[], [], []] for a in codecs for b in codecs}
    for lo in range(0, len(images), batch_size):
        sent, first = device(images[lo:lo + batch_size])
        for a in codecs:
            sent2, second = edge(roundtrip(sent, WireCodec(a)))
            for b in codecs:
                _, final = cloud(roundtrip(sent2, WireCodec(b)))
                for store, logits in zip(chunks[a, b], (first, second, final)):
                    store.append(logits)
    return {key: [torch.cat(c) for c in parts] for key, parts in chunks.items()}


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
    alone = TierRuntime(spec, runtime.segment, ConstantGate(True))
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
            wire_bytes = messages.request_from_batch(batch, wire).SerializeToString()
            tensor_codecs.decode(messages.pb.InferRequest.FromString(wire_bytes).tensor, _NO_LIMITS)

        nbytes.append(float(messages.request_from_batch(batch, wire).ByteSize()))
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
    pair: tuple[int, int] | None = None
    codecs: tuple[WireCodec, WireCodec] | None = None
    early_exits: bool = False
    thresholds: list[float | None] | None = None
    calibration: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "feasible": self.feasible,
                "exit_pair": list(self.pair) if self.pair else None,
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


def plan(model: MultiExitNet, meta: dict, val, test, s: Settings, log=print) -> dict:
    """Rank every candidate deployment of ``model`` on ``test`` (an ``ImageSet``), thresholds calibrated on ``val``.

    Returns ``{"candidates": [...], "chosen": index of the fastest feasible split, "reference_accuracy", "profile"}``
    with candidates sorted feasible first, then by predicted mean latency."""
    objective = Objective("drop", s.target_drop)
    fit, cal = (idx.numpy() for idx in gate_split(len(val), s.seed))
    sizes = batch_sizes(s.batch_size)
    overhead = s.overhead_ms / 1e3
    rows: list[Candidate] = []
    profile: dict = {"batch_sizes": sizes}
    reference: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="splitexit-plan-") as tmp:
        for pair in exit_pairs(model):
            t0 = time.perf_counter()
            bundles = export_split(model, meta, pair, Path(tmp) / f"{pair[0]}-{pair[1]}")
            model_id = bundles[0].model_id
            val_logits = cached_logits(bundles, val.images, s.codecs, s.batch_size)
            test_logits = cached_logits(bundles, test.images, s.codecs, s.batch_size)
            exact = val_logits["float32", "float32"][-1], test_logits["float32", "float32"][-1]
            reference.setdefault("val", exact[0].argmax(1).numpy() == val.labels.numpy())
            reference.setdefault("test", exact[1].argmax(1).numpy() == test.labels.numpy())
            inputs = tier_inputs(bundles, test.images[:s.batch_size])
            tiers = [TierCost(time_runtime(_runtime(b), x, sizes, s.reps), scale)
                     for b, x, scale in zip(bundles, inputs, s.scales)]
            entry = LinkCost(ZERO, link_profile(inputs[0], FLOAT32, model_id, sizes, s.reps)[1], None, overhead)
            wires = [WireCodec(c, z) for c in s.codecs for z in s.compressions]
            links = [{w: link_profile(inputs[k + 1], w, model_id, sizes, s.reps) for w in wires} for k in range(2)]
            costs, full = bundle_costs(bundles)
            names = [b.manifest["segment"]["stages"][-1] for b in bundles[:2]]
            profile[f"exits after {names[0]} and {names[1]}"] = {
                "compute_s": {b.tier: t.compute_s.to_dict() for b, t in zip(bundles, tiers)},
                "request_bytes": {f"{bundles[k].tier}_to_{bundles[k + 1].tier}": {str(w): c[0].to_dict()
                                  for w, c in links[k].items()} for k in range(2)}}
            family = stored_family(meta, s.policy, pair)
            for (a, b), logits in val_logits.items():
                es_cal = _scores(logits, val.labels, reference["val"], family, costs, full, cal)
                es_fit = _scores(logits, val.labels, reference["val"], family, costs, full, fit)
                es_test = _scores(test_logits[a, b], test.labels, reference["test"], family, costs, full)
                variants = [(False, [None, None], holds(es_cal, [None, None], objective, s), {})]
                try:
                    th, info = calibrate_scores(es_cal, objective, s.method, s.delta, s.bound, path=es_fit)
                    variants.append((True, th, True, info))
                except ConfigError as e:
                    variants.append((True, None, False, {"infeasible": str(e)}))
                for early, th, ok, info in variants:
                    predicted = outcome(es_test, th) if th is not None else {}
                    exit_of = es_test.exit_of(th) if th is not None else None
                    for w1 in (w for w in wires if w.name == a):
                        for w2 in (w for w in wires if w.name == b):
                            pred = dict(predicted)
                            if exit_of is not None:
                                link_costs = [LinkCost(*links[0][w1], s.link, overhead),
                                              LinkCost(*links[1][w2], s.link, overhead)]
                                run = predict_run(exit_of, s.batch_size, tiers, link_costs, entry)
                                pred.update(_named_bytes(run, bundles))
                            rows.append(Candidate(
                                f"split after {names[0]} | {names[1]}, {w1} | {w2}, "
                                + ("early exits" if early else "no early exit"),
                                "split", ok, pred, pair, (w1, w2), early, th, info))
            log(f"[plan] exits after {names[0]} and {names[1]}: {len(val_logits)} codec pairs calibrated and "
                f"predicted in {time.perf_counter() - t0:.0f} s")
        rows += baselines(bundles, test, reference["test"], s, entry, sizes, model_id)
    rows.sort(key=lambda r: (not r.feasible, r.predicted.get("latency_ms_mean", float("inf"))))
    chosen = next((i for i, r in enumerate(rows) if r.feasible and r.kind == "split"), None)
    return {"candidates": rows, "chosen": chosen, "profile": profile,
            "reference_accuracy": {k: float(v.mean()) for k, v in reference.items()}}


def _runtime(bundle: TierBundle) -> TierRuntime:
    return TierRuntime(replace(bundle.tier_spec(), is_last=True), bundle.segment, ConstantGate(True))


def _scores(logits, labels, reference: np.ndarray, family, costs, full, idx=None) -> ExitScores:
    """ExitScores of cached logits (rows ``idx``), drops measured against the float32 network's correctness."""
    es = ExitScores.build(logits, labels, family, costs, full)
    es = replace(es, reference=reference)
    return es if idx is None else es.subset(idx)


def _named_bytes(run: dict, bundles: list[TierBundle]) -> dict:
    names = [f"{a.tier}_to_{b.tier}" for a, b in zip(bundles, bundles[1:])]
    out = {k: v for k, v in run.items() if k != "bytes_per_sample"}
    out["bytes_per_sample"] = dict(zip(names, run["bytes_per_sample"]))
    return out


def baselines(bundles: list[TierBundle], test, correct: np.ndarray, s: Settings, entry: LinkCost,
              sizes: list[int], model_id: str) -> list[Candidate]:
    """The whole network on the device, and the raw images offloaded to the cloud over the link."""
    accuracy = {"accuracy": float(correct.mean()), "drop_points": 0.0, "flops_fraction": 1.0}
    images = test.images[:s.batch_size]
    n = len(test)
    device = time_runtime(whole_network_runtime(bundles, bundles[0].tier), images, sizes, s.reps)
    run = predict_run(np.zeros(n, dtype=int), s.batch_size, [TierCost(device, s.scales[0])], [], entry)
    rows = [Candidate("device only: the whole network on the device", "device_only", True,
                      {**accuracy, **{k: v for k, v in run.items() if k != "bytes_per_sample"},
                       "exits": [n], "bytes_per_sample": {}})]
    cloud = time_runtime(whole_network_runtime(bundles, bundles[-1].tier), images, sizes, s.reps)
    raw = LinkCost(*link_profile(images, FLOAT32, model_id, sizes, s.reps), s.link, s.overhead_ms / 1e3)
    run = predict_run(np.ones(n, dtype=int), s.batch_size, [TierCost(ZERO), TierCost(cloud, s.scales[-1])], [raw],
                      entry)
    rows.append(Candidate("cloud offload: the raw uint8 image to the cloud", "cloud_offload", True,
                          {**accuracy, **{k: v for k, v in run.items() if k != "bytes_per_sample"},
                           "exits": [0, n], "bytes_per_sample": {"device_to_cloud": run["bytes_per_sample"][0]}}))
    return rows
