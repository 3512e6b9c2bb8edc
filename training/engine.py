"""One training step loop and one evaluation loop, shared by every training stage."""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from common.data.datasets import ImageSet


def batches(data: ImageSet, batch_size: int, shuffle: bool, generator: torch.Generator | None = None):
    """Yield ``(images, labels)`` mini-batches of an in-memory split."""
    n = len(data)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        yield data.images[idx], data.labels[idx]


def augment_crop_flip(images: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Random crop after zero padding, and random horizontal flip, on a uint8 batch (the usual CIFAR recipe)."""
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    # One slice copy per sample: cheaper than gathering through an (n, c, h, w) index (scripts.bench_training).
    out = torch.empty_like(images)
    for i, (x, y, f) in enumerate(zip(dx.tolist(), dy.tolist(), flip.tolist())):
        crop = padded[i, :, y:y + h, x:x + w]
        out[i] = crop.flip(-1) if f else crop
    return out


def augment_crop_flip_gather(images: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """``augment_crop_flip`` through one advanced-indexing gather (the earlier implementation; same random draws,
    same output). Kept as the benchmark's baseline and the test's reference."""
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :]
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(images.shape[1])[None, :, None, None], rows, cols]
    out[flip] = out[flip].flip(-1)
    return out


def weighted_exit_loss(outputs: list[Tensor], labels: Tensor, weights: list[float], distill: float = 0.0,
                       distill_weight: float = 0.5) -> Tensor:
    """Distiller-style joint loss: the weighted sum of every exit's cross-entropy.

    With ``distill`` = T > 0, each early exit's term becomes ``(1 - distill_weight) * CE + distill_weight * T^2 *
    KL(final exit's softened outputs || this exit's)``: the exits are self-distilled from the final classifier, whose
    soft outputs are a fixed target (no gradient flows back through them).
    """
    total = sum(w * F.cross_entropy(o, labels) for w, o in zip(weights, outputs) if w)
    if distill > 0:
        teacher = F.softmax(outputs[-1].detach() / distill, dim=1)
        for w, o in zip(weights[:-1], outputs[:-1]):
            if w:
                kl = F.kl_div(F.log_softmax(o / distill, dim=1), teacher, reduction="batchmean") * distill ** 2
                total = total + w * distill_weight * (kl - F.cross_entropy(o, labels))
    return total


def train_step(model: nn.Module, images: Tensor, labels: Tensor, loss_fn: Callable[[list[Tensor], Tensor], Tensor],
               optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler | None, *,
               generator: torch.Generator, augment: bool, channels_last: bool = False,
               augment_fn: Callable[[Tensor, torch.Generator], Tensor] = augment_crop_flip) -> tuple[Tensor, list[Tensor]]:
    """Augment, forward, backward and one optimizer (and scheduler) step on one uint8 batch; returns the loss and the
    exits' logits. ``channels_last``: the batch is laid out NHWC, as a model moved with
    ``model.to(memory_format=torch.channels_last)`` computes fastest on CPU (scripts.bench_training)."""
    if augment:
        images = augment_fn(images, generator)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    outputs = model(images)
    loss = loss_fn(outputs, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss, outputs


def train_one_epoch(
    model: nn.Module,
    data: ImageSet,
    loss_fn: Callable[[list[Tensor], Tensor], Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    *,
    batch_size: int,
    generator: torch.Generator,
    augment: bool,
    max_batches: int | None = None,
    desc: str = "train",
    channels_last: bool = False,
) -> dict:
    """One pass over ``data``; returns mean loss, per-exit training accuracy, samples and seconds."""
    total_loss, seen, correct = 0.0, 0, None
    start = time.perf_counter()
    steps = (len(data) + batch_size - 1) // batch_size
    steps = min(steps, max_batches) if max_batches else steps
    bar = tqdm(batches(data, batch_size, True, generator), total=steps, desc=desc, leave=False, mininterval=2.0, disable=None)
    for step, (images, labels) in enumerate(bar):
        if step >= steps:
            break
        loss, outputs = train_step(model, images, labels, loss_fn, optimizer, scheduler, generator=generator,
                                   augment=augment, channels_last=channels_last)
        with torch.no_grad():
            hits = torch.stack([(o.argmax(1) == labels).sum() for o in outputs])
        correct = hits if correct is None else correct + hits
        total_loss += loss.item() * len(labels)
        seen += len(labels)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}")
    return {
        "loss": total_loss / max(seen, 1),
        "exit_accuracy": [float(c) / max(seen, 1) for c in (correct if correct is not None else [])],
        "samples": seen,
        "seconds": time.perf_counter() - start,
    }


@torch.no_grad()
def collect_logits(model: nn.Module, data: ImageSet, batch_size: int = 500) -> list[Tensor]:
    """Every exit's logits on ``data`` (eval mode), one ``(N, K)`` tensor per exit."""
    model.eval()
    chunks: list[list[Tensor]] = []
    for images, _ in batches(data, batch_size, False):
        chunks.append(model(images))
    return [torch.cat([c[k] for c in chunks]) for k in range(len(chunks[0]))]


def evaluate(model: nn.Module, data: ImageSet, batch_size: int = 500) -> dict:
    """Per-exit accuracy of ``model`` on ``data``."""
    logits = collect_logits(model, data, batch_size)
    return {"exit_accuracy": [float((lg.argmax(1) == data.labels).float().mean()) for lg in logits], "samples": len(data)}
