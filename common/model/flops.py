"""Per-sample floating-point operation counts, measured with ``torch.utils.flop_counter``.

The counter counts the matrix work (convolutions, linear layers, matmuls) as 2 x multiply-accumulates; element-wise
operations (BatchNorm, ReLU, additions) are not counted, as is usual for CNN FLOPs tables.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Run ``module`` in eval mode (BatchNorm must not update its statistics), then restore every submodule's own
    mode: a wrapper's single flag would not describe the modules it wraps."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


@torch.no_grad()
def count_flops(module: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of ``module(example)``, divided by the batch size of ``example``."""
    with eval_mode(module), FlopCounterMode(display=False) as counter:
        module(example)
    return int(counter.get_total_flops() // max(1, example.shape[0]))
