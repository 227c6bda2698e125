"""One training epoch and its step; validation is detector/evaluate/validate.py, the orchestration trainer.py."""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from detector.autobatch.memory import is_out_of_memory
from detector.device import autocast, device_ops, memory_text, prepare_images
from detector.distributed import PeerOutOfMemory, StepAgreement, average_gradients, unwrap
from detector.errors import DetectorError
from detector.train.optim import ModelEMA, Schedule

logger = logging.getLogger(__name__)

MAX_BAD_STEPS = 5  # consecutive non-finite losses before training stops


@dataclass
class LoopState:
    """Counters that survive across epochs (and across a resume)."""

    iteration: int = 0          # batches seen since the start of the run
    last_step: int = 0          # iteration at which the optimizer last stepped
    bad_steps: int = 0          # consecutive non-finite losses
    optimizer_steps: int = 0
    splits: int = 1             # micro-batches per batch on the device (doubled after each out-of-memory)
    oom_events: list[dict] = field(default_factory=list)  # where and how the batch was split
    # Progress inside the current epoch; not zero only in a checkpoint saved when a run was stopped mid-epoch.
    epoch_batches: int = 0      # batches of the epoch done (a resumed loader skips them)
    epoch_count: int = 0        # of which had a finite loss
    epoch_sums: dict[str, float] = field(default_factory=dict)  # their summed loss items


@dataclass
class StepContext:
    """What a training step needs besides the batch; built once per run by the trainer."""

    model: nn.Module
    criterion: object
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    scaler: torch.amp.GradScaler
    ema: ModelEMA | None
    device: torch.device
    amp_dtype: torch.dtype | None = None   # None = full precision
    channels_last: bool = False
    grad_clip: float = 10.0
    state: LoopState = field(default_factory=LoopState)
    noise: Any = None  # a noise_scale.GradientNoiseProbe to measure the gradient noise scale, or None
    agreement: StepAgreement | None = None  # under DDP: how the ranks decide each micro-batch together



def train_step(ctx: StepContext, images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Forward, loss, backward and, when enough batches are accumulated, an optimizer step + EMA update.

    If the device runs out of memory, the batch is split into twice as many micro-batches, for this
    batch and every later one: the device then holds half the images at a time, while the loader's
    batch, the schedule and the effective batch stay the same. The gradients accumulated since the
    last optimizer step are dropped (a failed backward may have added part of one) and the
    accumulation window restarts with this batch.

    Returns the detached loss items, or None when the loss was not finite and the batch was skipped.

    Raises:
        DetectorError: after MAX_BAD_STEPS non-finite losses in a row, or when even one image per
            micro-batch does not fit.
    """
    while True:
        here = False
        try:
            return whole_step(ctx, images, targets)
        except PeerOutOfMemory as err:
            traceback.clear_frames(err.__traceback__)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            here = True
            traceback.clear_frames(err.__traceback__)  # the frames hold the failed step's activations
        # Outside the except block, so the memory can really be freed.
        if here and ctx.agreement is not None:
            ctx.agreement.report_oom()
        _split_after_oom(ctx, len(images))


def whole_step(ctx: StepContext, images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """train_step without the out-of-memory recovery: the batch runs in ctx.state.splits micro-batches or the
    device's out-of-memory error propagates, with nothing counted. AutoBatch's probe and verification steps run
    this, so a batch that does not fit is seen as such."""
    state = ctx.state
    accumulate = ctx.schedule.apply(ctx.optimizer, state.iteration)
    # Under DDP, gradients are averaged over the ranks only on the batch before an optimizer step.
    steps_next = state.iteration + 1 - state.last_step >= accumulate
    # With a StepAgreement every backward runs under no_sync (a rank that fails mid-backward would leave the
    # others waiting in DDP's bucket reductions); the window's gradients are averaged before the optimizer step.
    no_sync = getattr(ctx.model, "no_sync", None) if not steps_next or ctx.agreement is not None else None
    with no_sync() if no_sync is not None else contextlib.nullcontext():
        items = _forward_backward(ctx, images, targets)
    window_start = state.iteration == state.last_step  # nothing accumulated before: .grad is this batch's
    state.iteration += 1
    if items is None:
        state.bad_steps += 1
        ctx.optimizer.zero_grad(set_to_none=True)
        state.last_step = state.iteration
        if state.bad_steps >= MAX_BAD_STEPS:
            raise DetectorError(f"{state.bad_steps} non-finite losses in a row: training stopped "
                                "(try a lower lr0, amp=false, or check the labels)")
        return None
    state.bad_steps = 0
    window_end = state.iteration - state.last_step >= accumulate
    if ctx.noise is not None:
        ctx.noise.observe(ctx, images, targets, first=window_start, last=window_end)
    if window_end:
        optimizer_step(ctx)
    return items


def _forward_backward(ctx: StepContext, images: torch.Tensor,
                      targets: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Loss and gradients of one batch in ctx.state.splits micro-batches; None if a loss was not finite."""
    size = math.ceil(len(images) / ctx.state.splits)
    sums: dict[str, torch.Tensor] = {}
    for start in range(0, len(images), size):
        part = prepare_images(images[start:start + size], ctx.device, ctx.channels_last)
        rows = targets if size >= len(images) else targets[(targets[:, 0] >= start) & (targets[:, 0] < start + size)]
        rows = rows.to(ctx.device, non_blocking=True)
        if start:
            rows = torch.cat([rows[:, :1] - start, rows[:, 1:]], dim=1)  # batch index within the micro-batch
        with autocast(ctx.device, ctx.amp_dtype):
            loss, items = ctx.criterion(ctx.model(part), rows, len(part))
        finite = bool(torch.isfinite(loss))
        if finite:
            ctx.scaler.scale(loss).backward()
        if ctx.agreement is not None:
            finite = ctx.agreement.after_backward(finite)
        if not finite:
            logger.warning("non-finite loss at iteration %d (%s); batch skipped", ctx.state.iteration + 1,
                           {k: round(float(v), 4) for k, v in items.items()})
            return None
        for key, value in items.items():
            sums[key] = sums.get(key, 0) + value * len(part)
    return {key: value / len(images) for key, value in sums.items()}


def _split_after_oom(ctx: StepContext, batch: int) -> None:
    state = ctx.state
    micro = math.ceil(batch / state.splits)
    if micro <= 1:
        raise DetectorError(f"out of memory with a single image per step on {ctx.device}: use a smaller imgsz "
                            "or model")
    ctx.optimizer.zero_grad(set_to_none=True)
    dropped = state.iteration - state.last_step
    state.last_step = state.iteration
    gc.collect()
    device_ops(ctx.device).empty_cache()
    state.splits *= 2
    state.oom_events.append({"iteration": state.iteration + 1, "micro_batch_before": micro,
                             "micro_batch_after": math.ceil(batch / state.splits), "dropped_batches": dropped})
    logger.warning("out of memory at iteration %d with %d images on %s: continuing with micro-batches of %d "
                   "(%d per batch, same effective batch)%s", state.iteration + 1, micro, ctx.device,
                   math.ceil(batch / state.splits), state.splits,
                   f"; dropped the gradients of {dropped} accumulated batch(es)" if dropped else "")


def optimizer_step(ctx: StepContext) -> None:
    if ctx.agreement is not None:
        average_gradients(ctx.model)
    ctx.scaler.unscale_(ctx.optimizer)
    if ctx.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(ctx.model.parameters(), max_norm=ctx.grad_clip)
    ctx.scaler.step(ctx.optimizer)
    ctx.scaler.update()
    ctx.optimizer.zero_grad(set_to_none=True)
    if ctx.ema is not None:
        ctx.ema.update(unwrap(ctx.model))
    ctx.state.last_step = ctx.state.iteration
    ctx.state.optimizer_steps += 1



def train_one_epoch(ctx: StepContext, loader, *, epoch: int, epochs: int, progress: bool = True,
                    stop: Callable[[], bool] | None = None) -> dict[str, float] | None:
    """Train over `loader` once; returns the epoch's mean loss items (loss_box, loss_cls, loss_dfl).

    The progress bar shows each batch's side (multi_scale varies it from batch to batch).

    An epoch may span two runs. `stop` is asked after every batch; once it says True the epoch ends
    there and None is returned, with the batches done and their loss sums in ctx.state for a
    checkpoint. A run resumed from it passes a loader that skips those batches (set_epoch), and the
    sums carry on, so the epoch's means are those of an uninterrupted one.
    """
    ctx.model.train()
    state = ctx.state
    sums, count = dict(state.epoch_sums), state.epoch_count
    # On a terminal the bar redraws in place; in a file or pipe (CI, nohup) each redraw stays, so it redraws
    # every 30 s there, and the epoch's last state ends the line.
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", total=len(loader), disable=not progress, leave=True,
               dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30.0,
               bar_format="{l_bar}{bar:12}{r_bar}")
    for batch in bar:
        items = train_step(ctx, batch.images, batch.targets)
        state.epoch_batches += 1
        if items is not None:
            count += 1
            for key, value in items.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        if progress and count:
            means = " ".join(f"{k.removeprefix('loss_')} {v / count:.3f}" for k, v in sums.items())
            bar.set_description(f"epoch {epoch + 1}/{epochs} mem {memory_text(ctx.device)} {means} "
                                f"inst {len(batch.targets)} size {batch.images.shape[-1]}", refresh=False)
        if stop is not None and stop():
            bar.close()
            state.epoch_sums, state.epoch_count = sums, count
            return None
    state.epoch_batches, state.epoch_count, state.epoch_sums = 0, 0, {}
    return {f"train/{k}": v / max(count, 1) for k, v in sums.items()}
