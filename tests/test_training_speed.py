"""The training speed-ups change nothing but speed: same augmentation, same step in NHWC, a cascade run end to end.
(How fast they are is measured by scripts.bench_training, never here.)"""
from __future__ import annotations

import copy

import torch

from common.model import ModelSpec, MultiExitNet
from training import checkpoint
from training.config import TrainConfig
from training.engine import augment_crop_flip, augment_crop_flip_gather, train_step, weighted_exit_loss
from training.train import train


def test_slice_augmentation_equals_the_gather_it_replaced():
    images = torch.randint(0, 256, (37, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for seed in range(3):
        a = augment_crop_flip(images, torch.Generator().manual_seed(seed))
        b = augment_crop_flip_gather(images, torch.Generator().manual_seed(seed))
        assert a.dtype == torch.uint8 and torch.equal(a, b)


def test_a_channels_last_step_computes_the_same_step():
    torch.manual_seed(0)
    model = MultiExitNet(ModelSpec(width=0.125, cascade=True)).train()
    nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    labels = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(3))
    losses, params = [], []
    for m, cl in ((model, False), (nhwc, True)):
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, foreach=cl)
        loss, outputs = train_step(m, images, labels, lambda o, y: weighted_exit_loss(o, y, [0.5, 0.5, 1.0], 3.0),
                                   opt, None, generator=torch.Generator().manual_seed(4), augment=True,
                                   channels_last=cl)
        assert [tuple(o.shape) for o in outputs] == [(16, 10)] * 3
        losses.append(loss.item())
        params.append([p.detach().contiguous() for p in m.parameters()])
    assert abs(losses[0] - losses[1]) < 1e-4
    # NHWC runs other kernels (oneDNN convolutions, another BatchNorm reduction): gradients agree to about 1e-3,
    # the size of float32 rounding carried through 17 batch-normalised layers, not bitwise
    assert all(torch.allclose(a, b, atol=1e-3) for a, b in zip(*params))


def test_a_cascade_run_in_nhwc_saves_a_checkpoint_that_loads(tmp_path):
    cfg = TrainConfig(width=0.125, exit_points=[1, 2, 3], loss_weights=[0.3, 0.3, 0.3, 1.0], cascade=True,
                      distill=3.0, epochs=1, max_batches=2, limit_train=256, limit_val=128, batch_size=64,
                      epochs_gates=1, architecture="resnet18_cifar_blocks")
    assert cfg.channels_last
    meta = train(cfg, tmp_path / "c")
    model, saved = checkpoint.load(tmp_path / "c" / "checkpoint.safetensors")
    assert model.spec.cascade and len(meta["gates"]) == 3 and saved["config"]["channels_last"]
    assert all(p.is_contiguous() for p in model.parameters())
