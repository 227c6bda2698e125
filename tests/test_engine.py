"""The training step driven by a toy model: accumulation, skipping non-finite losses, EMA."""

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from detector.errors import DetectorError
from detector.train.engine import LoopState, StepContext, train_one_epoch, train_step
from detector.train.optim import ModelEMA, Schedule, build_optimizer


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, images):
        return self.head(self.conv(images).mean(dim=(2, 3)))


def toy_criterion(outputs, targets, batch_size):
    """Mean squared error times the batch size, like DetectionLoss (sum over images).

    Targets are rows [batch_index, y0, y1], one per image, as detection targets carry their image index.
    """
    wanted = torch.zeros_like(outputs)
    wanted[targets[:, 0].long()] = targets[:, 1:]
    loss = ((outputs - wanted) ** 2).mean() * batch_size
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
    targets = torch.cat([torch.arange(n, dtype=torch.float32)[:, None], torch.randn(n, 2, generator=generator)], 1)
    return images, targets


def batches(images, targets, size):
    """(images, rows) of consecutive batches, rows renumbered from 0 within each batch."""
    for start in range(0, len(images), size):
        rows = targets[start:start + size].clone()
        rows[:, 0] -= start
        yield images[start:start + size], rows


def test_four_batches_of_four_accumulated_equal_one_batch_of_sixteen():
    torch.manual_seed(0)
    model_a = ToyModel()
    model_b = copy.deepcopy(model_a)
    images, targets = data()
    small = make_context(model_a, accumulate=4)
    for i, (part, rows) in enumerate(batches(images, targets, 4)):
        train_step(small, part, rows)
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
    nan_targets = targets.clone()
    nan_targets[:, 1:] = float("nan")
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
    loader = [SimpleNamespace(images=part, targets=rows) for part, rows in batches(images, targets, 2)]
    first = train_one_epoch(ctx, loader, epoch=0, epochs=3, progress=False)
    for epoch in range(1, 3):
        last = train_one_epoch(ctx, loader, epoch=epoch, epochs=3, progress=False)
    assert set(first) == {"train/loss_toy"} and last["train/loss_toy"] < first["train/loss_toy"]
    assert ctx.state == LoopState(iteration=12, last_step=12, bad_steps=0, optimizer_steps=12)
    assert ctx.ema.updates == 12
    assert not torch.equal(ctx.ema.module.head.weight, model.head.weight)


class OutOfMemoryAbove(nn.Module):
    """Wraps a model; from its `after`-th call on, a forward on more than `limit` images raises CUDA's OOM."""

    def __init__(self, model, *, limit, after):
        super().__init__()
        self.model, self.limit, self.after, self.calls = model, limit, after, 0

    def forward(self, images):
        self.calls += 1
        if self.calls > self.after and len(images) > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate for {len(images)} images")
        return self.model(images)


def test_out_of_memory_mid_run_splits_the_batch_and_keeps_the_effective_batch():
    torch.manual_seed(0)
    model = ToyModel()
    reference = copy.deepcopy(model)
    images, targets = data(32)
    # 8 batches of 4, accumulating 2: the device fails on 4 images from the 5th batch (an optimizer
    # step boundary) on, so nothing accumulated is lost and the run must match an unbroken one exactly.
    broken = make_context(OutOfMemoryAbove(model, limit=2, after=4), accumulate=2)
    plain = make_context(reference, accumulate=2)
    for part, rows in batches(images, targets, 4):
        assert train_step(broken, part, rows) is not None
        train_step(plain, part, rows)
    assert broken.state.splits == 2 and broken.state.iteration == plain.state.iteration == 8
    assert broken.state.optimizer_steps == plain.state.optimizer_steps == 4
    assert broken.state.oom_events == [{"iteration": 5, "micro_batch_before": 4, "micro_batch_after": 2,
                                        "dropped_batches": 0}]
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_out_of_memory_inside_an_accumulation_window_restarts_the_window():
    model = OutOfMemoryAbove(ToyModel(), limit=1, after=1)
    ctx = make_context(model, accumulate=2)
    images, targets = data(8)
    steps = [train_step(ctx, part, rows) is not None for part, rows in batches(images, targets, 2)]
    # Batch 2 fails mid-window: batch 1's gradient is dropped, and the window restarts at batch 2.
    assert all(steps) and ctx.state.splits == 2 and ctx.state.oom_events[0]["dropped_batches"] == 1
    assert ctx.state.optimizer_steps == 1 and ctx.state.last_step == 3


def test_out_of_memory_with_one_image_per_micro_batch_is_a_clear_error():
    ctx = make_context(OutOfMemoryAbove(ToyModel(), limit=0, after=0), accumulate=1)
    images, targets = data(2)
    with pytest.raises(DetectorError, match="out of memory with a single image"):
        train_step(ctx, images, targets)
