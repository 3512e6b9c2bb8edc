"""Split a multi-exit network into per-tier segments.

Segment ``i`` runs backbone stages ``[start, end)`` and then its exit head; the first segment also owns the input
normalisation (so the device tier accepts raw uint8 images) and the last segment's head is the final classifier.
Running the segments in sequence, passing each one's features to the next, computes exactly what the whole
``MultiExitNet`` computes: the segments share the very same modules.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from common.errors import ConfigError
from common.model import ModelSpec, MultiExitNet

TIER_NAMES = ("device", "edge", "cloud")


class Segment(nn.Module):
    """Stages of one tier plus the exit head at its end. ``forward`` returns ``(features to send, exit_logits)``.

    ``preprocess`` runs on what the tier receives (input normalisation on the device, a bottleneck's decoder on the
    tier after it) and ``encode`` on what it sends (a bottleneck's encoder); the exit head reads the features
    before ``encode``.
    """

    def __init__(self, stages: list[nn.Module], head: nn.Module, preprocess: nn.Module | None = None,
                 encode: nn.Module | None = None) -> None:
        super().__init__()
        self.preprocess = preprocess if preprocess is not None else nn.Identity()
        self.stages = nn.Sequential(*stages)
        self.encode = encode if encode is not None else nn.Identity()
        self.head = head

    def body(self, x: Tensor) -> Tensor:
        """What the tier sends on: preprocess, stages, encode (no exit head)."""
        return self.encode(self.stages(self.preprocess(x)))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.stages(self.preprocess(x))
        return self.encode(features), self.head(features)


def is_last_tier(tier_index: int, tiers: list[str] | tuple[str, ...]) -> bool:
    """Whether the tier at ``tier_index`` of ``tiers`` is the last one: it always answers and forwards nothing."""
    return tier_index == len(tiers) - 1


@dataclass(frozen=True)
class SegmentPlan:
    """Which part of the model a tier holds: stages ``[start, end)`` and exit ``exit_index``."""

    tier: str
    index: int
    start: int
    end: int
    exit_index: int
    stage_names: tuple[str, ...]
    is_last: bool


def plan_segments(spec: ModelSpec, stage_names: list[str], tiers: tuple[str, ...] = TIER_NAMES) -> list[SegmentPlan]:
    """Cut the stages at the model's exit points: one segment per tier, each ending where an exit sits."""
    points = list(spec.exit_points)
    if len(points) != len(tiers) - 1:
        raise ConfigError(f"{len(tiers)} tiers need {len(tiers) - 1} exit points, the model has {points}"
                          + ("; choose two with python -m scripts.plan --export DIR" if len(points) > len(tiers) - 1
                             else ""))
    bounds = [0, *points, len(stage_names)]
    return [
        SegmentPlan(tier, i, bounds[i], bounds[i + 1], i, tuple(stage_names[bounds[i]:bounds[i + 1]]),
                    is_last_tier(i, tiers))
        for i, tier in enumerate(tiers)
    ]


def build_segment(model: MultiExitNet, plan: SegmentPlan) -> Segment:
    """The segment of ``model`` described by ``plan``, sharing the model's modules (no copy)."""
    stages = list(model.backbone.stages[plan.start:plan.end])
    head = model.backbone.classifier if plan.is_last else model.exits[plan.exit_index]
    bottleneck = model.bottleneck_encoder is not None
    preprocess = model.normalize if plan.index == 0 else model.bottleneck_decoder if plan.index == 1 and bottleneck \
        else None
    encode = model.bottleneck_encoder if plan.index == 0 and bottleneck else None
    return Segment(stages, head, preprocess=preprocess, encode=encode)


def split_model(model: MultiExitNet, tiers: tuple[str, ...] = TIER_NAMES) -> list[Segment]:
    """All segments of ``model``, first to last."""
    return [build_segment(model, p) for p in plan_segments(model.spec, model.backbone.stage_names, tiers)]


def segment_flops(model: MultiExitNet, tiers: tuple[str, ...] = TIER_NAMES) -> list[tuple[int, int]]:
    """Per-sample ``(stage FLOPs, exit head FLOPs)`` of each segment, first to last."""
    from common.model.flops import count_flops, eval_mode  # local: counting pulls in torch's dispatch machinery

    x = torch.zeros((1, *model.spec.input_shape), dtype=torch.uint8)
    out = []
    for segment in split_model(model, tiers):
        stages = count_flops(_StagesOnly(segment), x)
        out.append((stages, count_flops(segment, x) - stages))
        with torch.no_grad(), eval_mode(segment):
            x, _ = segment(x)
    return out


def cost_table(model: MultiExitNet) -> tuple[list[float], float]:
    """``(costs, full)``: FLOPs per sample of leaving at each exit (every segment and exit head up to and including
    that exit's), and of the whole network without early exit heads (stages + final classifier). Any number of
    exits: the model is cut once per exit, whatever the tiers."""
    flops = segment_flops(model, tuple(f"part{i}" for i in range(model.num_exits)))
    costs, total = [], 0.0
    for stages, head in flops:
        total += stages + head
        costs.append(total)
    return costs, float(sum(stages for stages, _ in flops) + flops[-1][1])


class _StagesOnly(nn.Module):
    """A segment without its exit head, to count the stages' FLOPs alone."""

    def __init__(self, segment: Segment) -> None:
        super().__init__()
        self.segment = segment

    def forward(self, x: Tensor) -> Tensor:
        return self.segment.body(x)
