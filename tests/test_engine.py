"""The training step driven by a toy model: accumulation, skipping non-finite losses, EMA."""

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from detector.engine import LoopState, StepContext, train_one_epoch, train_step
from detector.errors import DetectorError
from detector.optim import ModelEMA, Schedule, build_optimizer


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, images):
        return self.head(self.conv(images).mean(dim=(2, 3)))


def toy_criterion(outputs, targets, batch_size):
    """Mean squared error times the batch size, like DetectionLoss (sum over images)."""
    loss = ((outputs - targets) ** 2).mean() * batch_size
    return loss, {"loss_toy": loss.detach() / batch_size}


def make_context(model, accumulate, weight_decay=5e-4):
    optimizer = build_optimizer(model, name="SGD", lr=0.05, momentum=0.9, weight_decay=weight_decay)
    schedule = Schedule(lr0=0.05, lrf=0.01, epochs=10, iters_per_epoch=100, warmup_iters=0, warmup_bias_lr=0.0,
                        warmup_momentum=0.9, momentum=0.9, accumulate=accumulate)
    return StepContext(model=model, criterion=toy_criterion, optimizer=optimizer, schedule=schedule,
                       scaler=torch.amp.GradScaler("cpu", enabled=False), ema=None, device=torch.device("cpu"),
                       grad_clip=0.0)


def data(n=16):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=generator)
    targets = torch.randn(n, 2, generator=generator)
    return images, targets


def test_four_batches_of_four_accumulated_equal_one_batch_of_sixteen():
    torch.manual_seed(0)
    model_a = ToyModel()
    model_b = copy.deepcopy(model_a)
    images, targets = data()
    small = make_context(model_a, accumulate=4)
    for i in range(4):
        train_step(small, images[4 * i:4 * i + 4], targets[4 * i:4 * i + 4])
        assert small.state.optimizer_steps == (1 if i == 3 else 0)
    large = make_context(model_b, accumulate=1)
    train_step(large, images, targets)
    assert large.state.optimizer_steps == 1
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.equal(model_a.head.weight, ToyModel().head.weight)


def test_non_finite_losses_are_skipped_then_stop_training():
    model = ToyModel()
    before = copy.deepcopy(model.state_dict())
    ctx = make_context(model, accumulate=1)
    images, targets = data(4)
    nan_targets = torch.full_like(targets, float("nan"))
    for _ in range(4):
        assert train_step(ctx, images, nan_targets) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert train_step(ctx, images, targets) is not None  # a good batch resets the count
    for _ in range(4):
        train_step(ctx, images, nan_targets)
    with pytest.raises(DetectorError, match="non-finite"):
        train_step(ctx, images, nan_targets)


def test_epoch_reports_mean_losses_and_updates_ema():
    model = ToyModel()
    ctx = make_context(model, accumulate=1)
    ctx.ema = ModelEMA(model, tau=1.0)
    images, targets = data(8)
    loader = [SimpleNamespace(images=images[i:i + 2], targets=targets[i:i + 2]) for i in range(0, 8, 2)]
    first = train_one_epoch(ctx, loader, epoch=0, epochs=3, image_size=8, progress=False)
    for epoch in range(1, 3):
        last = train_one_epoch(ctx, loader, epoch=epoch, epochs=3, image_size=8, progress=False)
    assert set(first) == {"train/loss_toy"} and last["train/loss_toy"] < first["train/loss_toy"]
    assert ctx.state == LoopState(iteration=12, last_step=12, bad_steps=0, optimizer_steps=12)
    assert ctx.ema.updates == 12
    assert not torch.equal(ctx.ema.module.head.weight, model.head.weight)
