"""Split a multi-exit network into per-tier segments.

A tier holds a run of consecutive exits: segment ``i`` runs backbone stages ``[start, end)``, one block of stages
per exit followed by that exit's head, so a sample can leave after any of them. The first segment also owns the
input normalisation (so the device tier accepts raw uint8 images) and the last segment's last head is the final
classifier. Every tier but the last ends at one of its exits; where the tiers end is the *split*: the index of the
last exit of each tier before the last (``default_split`` spreads the early exits evenly over those tiers). Running
the segments in sequence computes exactly what the whole ``MultiExitNet`` computes: they share its very modules.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from common.errors import ConfigError
from common.model import ModelSpec, MultiExitNet, apply_head

TIER_NAMES = ("device", "edge", "cloud")


class Segment(nn.Module):
    """The stages of one tier cut into one block per exit, and the exits' heads.

    ``run_exit(j, x, previous)`` runs block ``j`` and head ``j``: ``(features, logits)``. ``previous`` is the logits
    of the exit before (cascade heads read them; other heads ignore them). ``send`` encodes what the tier forwards.
    ``preprocess`` runs on what the tier receives (input normalisation on the device, a bottleneck's decoder on the
    tier after it) and ``encode`` on what it sends (a bottleneck's encoder); heads read the features before ``encode``.
    ``forward`` runs every exit on every sample: ``(features to send, [logits of each exit])``.
    """

    def __init__(self, blocks: list[list[nn.Module]], heads: list[nn.Module], preprocess: nn.Module | None = None,
                 encode: nn.Module | None = None) -> None:
        super().__init__()
        if len(blocks) != len(heads) or not heads:
            raise ValueError(f"a segment needs one block per exit head, got {len(blocks)} and {len(heads)}")
        self.preprocess = preprocess if preprocess is not None else nn.Identity()
        self.blocks = nn.ModuleList(nn.Sequential(*stages) for stages in blocks)
        self.encode = encode if encode is not None else nn.Identity()
        self.heads = nn.ModuleList(heads)

    @property
    def num_exits(self) -> int:
        return len(self.heads)

    def block(self, j: int, x: Tensor) -> Tensor:
        """The features at exit ``j`` from the features at exit ``j - 1`` (the received tensor for ``j`` = 0)."""
        return self.blocks[j](self.preprocess(x) if j == 0 else x)

    def run_exit(self, j: int, x: Tensor, previous: Tensor | None = None) -> tuple[Tensor, Tensor]:
        features = self.block(j, x)
        return features, apply_head(self.heads[j], features, previous)

    def send(self, features: Tensor) -> Tensor:
        return self.encode(features)

    def body(self, x: Tensor) -> Tensor:
        """What the tier sends on: preprocess, every block, encode (no exit head)."""
        for j in range(self.num_exits):
            x = self.block(j, x)
        return self.send(x)

    def forward(self, x: Tensor, previous: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        logits = []
        for j in range(self.num_exits):
            x, lg = self.run_exit(j, x, previous)
            logits.append(lg)
            previous = lg
        return self.send(x), logits


def is_last_tier(tier_index: int, tiers: list[str] | tuple[str, ...]) -> bool:
    """Whether the tier at ``tier_index`` of ``tiers`` is the last one: it always answers and forwards nothing."""
    return tier_index == len(tiers) - 1


@dataclass(frozen=True)
class SegmentPlan:
    """Which part of the model a tier holds: stages ``[start, end)`` and the exits ``exits`` (global indices, the
    final classifier's is the highest), exit ``exits[j]`` after stage boundary ``points[j]``."""

    tier: str
    index: int
    start: int
    end: int
    exits: tuple[int, ...]
    points: tuple[int, ...]
    stage_names: tuple[str, ...]
    is_last: bool

    @property
    def exit_index(self) -> int:
        """The tier's last exit: where its forwarded samples leave it."""
        return self.exits[-1]


def default_split(num_early: int, num_tiers: int) -> tuple[int, ...]:
    """The last exit of each tier but the last when nobody chose: the early exits spread evenly over those tiers,
    earlier tiers taking one more when they do not divide (4 exits on device / edge: ``(1, 3)``, two each)."""
    early_tiers = num_tiers - 1
    if num_early < early_tiers:
        raise ConfigError(f"{num_tiers} tiers need at least {early_tiers} early exits, the model has {num_early}")
    base, extra = divmod(num_early, early_tiers)
    ends, last = [], -1
    for i in range(early_tiers):
        last += base + (1 if i < extra else 0)
        ends.append(last)
    return tuple(ends)


def check_split(split, num_early: int, num_tiers: int) -> tuple[int, ...]:
    """``split`` as a tuple, refused unless it names one increasing early exit per tier but the last."""
    split = tuple(split)
    if (len(split) != num_tiers - 1 or list(split) != sorted(set(split))
            or not all(isinstance(e, int) and 0 <= e < num_early for e in split)):
        raise ConfigError(f"a split of {num_tiers} tiers names the last exit of each of the first {num_tiers - 1}, "
                          f"increasing, among early exits 0..{num_early - 1}; got {list(split)}")
    return split


def plan_segments(spec: ModelSpec, stage_names: list[str], tiers: tuple[str, ...] = TIER_NAMES,
                  split=None) -> list[SegmentPlan]:
    """Cut the stages at the split: one segment per tier, each but the last ending at its last exit."""
    points = [*spec.exit_points, len(stage_names)]
    num_early = len(spec.exit_points)
    split = default_split(num_early, len(tiers)) if split is None else check_split(split, num_early, len(tiers))
    if spec.bottleneck.channels and split[0] != 0:
        raise ConfigError("a learned bottleneck sits on the link after the first exit: the first tier must end "
                          f"there (split starting with 0), got {list(split)}")
    plans, first, start = [], 0, 0
    for i, tier in enumerate(tiers):
        last = split[i] if i < len(split) else num_early
        exits = tuple(range(first, last + 1))
        end = points[last]
        plans.append(SegmentPlan(tier, i, start, end, exits, tuple(points[e] for e in exits),
                                 tuple(stage_names[start:end]), is_last_tier(i, tiers)))
        first, start = last + 1, end
    return plans


def build_segment(model: MultiExitNet, plan: SegmentPlan) -> Segment:
    """The segment of ``model`` described by ``plan``, sharing the model's modules (no copy)."""
    stages = model.backbone.stages
    bounds = [plan.start, *plan.points]
    blocks = [list(stages[bounds[j]:bounds[j + 1]]) for j in range(len(plan.exits))]
    final = model.num_exits - 1
    heads = [model.backbone.classifier if e == final else model.exits[e] for e in plan.exits]
    bottleneck = model.bottleneck_encoder is not None
    preprocess = model.normalize if plan.index == 0 else model.bottleneck_decoder if plan.index == 1 and bottleneck \
        else None
    encode = model.bottleneck_encoder if plan.index == 0 and bottleneck else None
    return Segment(blocks, heads, preprocess=preprocess, encode=encode)


def split_model(model: MultiExitNet, tiers: tuple[str, ...] = TIER_NAMES, split=None) -> list[Segment]:
    """All segments of ``model``, first to last."""
    return [build_segment(model, p) for p in plan_segments(model.spec, model.backbone.stage_names, tiers, split)]


@dataclass(frozen=True)
class SegmentFlops:
    """Per-sample FLOPs of one segment: of each exit's block of stages and of its head, and of encoding what the
    tier sends (a learned bottleneck's encoder; 0 without one). A sample pays the blocks and heads up to the exit it
    leaves at, and ``send`` when it is forwarded."""

    blocks: tuple[int, ...]
    heads: tuple[int, ...]
    send: int

    @property
    def total(self) -> int:
        """What a sample that runs the whole segment and is forwarded costs."""
        return sum(self.blocks) + sum(self.heads) + self.send


def segment_flops(model: MultiExitNet, tiers: tuple[str, ...] = TIER_NAMES, split=None) -> list[SegmentFlops]:
    """The FLOPs of each segment of ``model``, first to last."""
    from common.model.flops import count_flops, eval_mode  # local: counting pulls in torch's dispatch machinery

    x = torch.zeros((1, *model.spec.input_shape), dtype=torch.uint8)
    previous = torch.zeros((1, model.spec.num_classes))  # what a cascade head reads besides its features
    out = []
    for segment in split_model(model, tiers, split):
        blocks, heads = [], []
        for j in range(segment.num_exits):
            blocks.append(count_flops(_Part(segment, lambda h, j=j: segment.block(j, h)), x))
            with torch.no_grad(), eval_mode(segment):
                x = segment.block(j, x)
            heads.append(count_flops(_Part(segment, lambda h, j=j: apply_head(segment.heads[j], h, previous)), x))
        send = count_flops(_Part(segment, segment.send), x)
        with torch.no_grad(), eval_mode(segment):
            x = segment.send(x)
        out.append(SegmentFlops(tuple(blocks), tuple(heads), send))
    return out


def cost_table(model: MultiExitNet) -> tuple[list[float], float]:
    """``(costs, full)``: FLOPs per sample of leaving at each exit (every block and exit head up to and including
    that exit's), and of the whole network without early exit heads (stages + final classifier)."""
    n = model.num_exits
    parts = segment_flops(model, tuple(f"part{i}" for i in range(n)), tuple(range(n - 1)))
    costs, total = [], 0.0
    for part in parts:
        total += part.blocks[0] + part.heads[0]
        costs.append(total)
        total += part.send
    return costs, float(sum(sum(p.blocks) + p.send for p in parts) + parts[-1].heads[-1])


class _Part(nn.Module):
    """A function of a segment as a module, so the FLOP counter can run it (in eval mode: the segment is its child)."""

    def __init__(self, segment: Segment, fn) -> None:
        super().__init__()
        self.segment, self.fn = segment, fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)
