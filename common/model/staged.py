"""A backbone as an ordered list of named stages and a final classifier, with its feature-shape table."""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class StagedBackbone(nn.Module):
    """Ordered stages ``stages[0] .. stages[n-1]`` followed by ``classifier``.

    ``forward`` runs everything; split points and exit heads refer to stage boundaries: boundary ``k`` is the
    output of ``stages[k-1]`` (``1 <= k <= n``).
    """

    # True when the stages keep the parameter names of a model they were cut from (``common.model.convert``).
    source_names = False

    def __init__(self, stages: list[tuple[str, nn.Module]], classifier: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.stage_names = [name for name, _ in stages]
        self.stages = nn.ModuleList(module for _, module in stages)
        self.classifier = classifier
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.classifier(x)

    @torch.no_grad()
    def feature_shapes(self, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Per-sample output shape after each stage for a per-sample ``input_shape`` such as ``(3, 32, 32)``.

        Runs a meta-device copy, so it costs no real memory or compute whatever the model size.
        """
        meta = copy.deepcopy(self).to("meta").eval()  # batch of one: BatchNorm must not need batch statistics
        x = torch.empty((1, *input_shape), device="meta")
        shapes = []
        for stage in meta.stages:
            x = stage(x)
            shapes.append(tuple(x.shape[1:]))
        return shapes
