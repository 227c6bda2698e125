"""One training epoch and one evaluation pass; the orchestration lives in trainer.py."""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from detector.autobatch.memory import is_out_of_memory
from detector.device import autocast, memory_text, prepare_images
from detector.distributed import unwrap
from detector.errors import DetectorError
from detector.evaluate.metrics import CONFUSION_CONF, CONFUSION_IOU, DetectionMetrics, paused_gc
from detector.evaluate.plots import plot_batch, plot_confusion_matrix, plot_pr_curves
from detector.model.postprocess import Detections, decode, non_max_suppression
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
    state = ctx.state
    accumulate = ctx.schedule.apply(ctx.optimizer, state.iteration)
    # Under DDP, gradients are averaged over the ranks only on the batch before an optimizer step.
    steps_next = state.iteration + 1 - state.last_step >= accumulate
    no_sync = getattr(ctx.model, "no_sync", None) if not steps_next else None
    while True:
        out_of_memory = False
        try:
            with no_sync() if no_sync is not None else contextlib.nullcontext():
                items = _forward_backward(ctx, images, targets)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            out_of_memory = True
            traceback.clear_frames(err.__traceback__)  # the frames hold the failed step's activations
        if not out_of_memory:
            break
        _split_after_oom(ctx, len(images))  # outside the except block, so the memory can really be freed
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
        if not torch.isfinite(loss):
            logger.warning("non-finite loss at iteration %d (%s); batch skipped", ctx.state.iteration + 1,
                           {k: round(float(v), 4) for k, v in items.items()})
            return None
        ctx.scaler.scale(loss).backward()
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
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    state.splits *= 2
    state.oom_events.append({"iteration": state.iteration + 1, "micro_batch_before": micro,
                             "micro_batch_after": math.ceil(batch / state.splits), "dropped_batches": dropped})
    logger.warning("out of memory at iteration %d with %d images on %s: continuing with micro-batches of %d "
                   "(%d per batch, same effective batch)%s", state.iteration + 1, micro, ctx.device,
                   math.ceil(batch / state.splits), state.splits,
                   f"; dropped the gradients of {dropped} accumulated batch(es)" if dropped else "")


def optimizer_step(ctx: StepContext) -> None:
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



def train_one_epoch(ctx: StepContext, loader, *, epoch: int, epochs: int, image_size: int,
                    progress: bool = True, stop: Callable[[], bool] | None = None) -> dict[str, float] | None:
    """Train over `loader` once; returns the epoch's mean loss items (loss_box, loss_cls, loss_dfl).

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
                                f"inst {len(batch.targets)} size {image_size}", refresh=False)
        if stop is not None and stop():
            bar.close()
            state.epoch_sums, state.epoch_count = sums, count
            return None
    state.epoch_batches, state.epoch_count, state.epoch_sums = 0, 0, {}
    return {f"train/{k}": v / max(count, 1) for k, v in sums.items()}


@torch.no_grad()
def predict_loader(model: nn.Module, loader, *, device: torch.device, category_ids: list[int],
                   conf: float, iou: float, max_det: int, amp_dtype: torch.dtype | None = None,
                   channels_last: bool = False, progress: bool = True, classes: list[int] | None = None
                   ) -> tuple[list[dict], list[int]]:
    """Run the model over a validation loader; returns COCO detections (original pixels) and image ids, of
    `classes` only when given (the classes= setting).

    Callers pass the model as it should run: Detector.fused_copy() folds BatchNorm into the convolutions
    (the same outputs up to float rounding; 1.07x faster on CPU, docs/inference.md).
    """
    model.eval()
    detections, image_ids = [], []
    # The bar erases itself when done: only on a terminal; in a file it would run into the metrics table.
    bar = tqdm(loader, desc="validating", disable=not progress or not sys.stderr.isatty(), leave=False,
               dynamic_ncols=True)
    with paused_gc():
        for batch in bar:
            results = _detect(model, batch.images, device=device, conf=conf, iou=iou, max_det=max_det,
                              amp_dtype=amp_dtype, channels_last=channels_last, classes=classes)
            for i, result in enumerate(results):
                image_id = int(batch.image_ids[i])
                image_ids.append(image_id)
                detections.extend(to_coco(result, batch.scales[i], batch.pads[i], batch.orig_sizes[i],
                                          image_id, category_ids))
    return detections, image_ids


def _detect(model: nn.Module, images: torch.Tensor, *, device: torch.device, conf: float, iou: float, max_det: int,
            amp_dtype: torch.dtype | None, channels_last: bool, classes: list[int] | None = None) -> list[Detections]:
    """A uint8 batch's detections in its input pixels."""
    inputs = prepare_images(images, device, channels_last)
    with autocast(device, amp_dtype):
        outputs = model(inputs)
    boxes, scores = decode([o.float() for o in outputs], model.strides, model.reg_max)
    return non_max_suppression(boxes, scores, conf=conf, iou=iou, max_det=max_det, classes=classes)


@torch.no_grad()
def plot_validation(model: nn.Module, loader, metrics: DetectionMetrics, names: list[str], run_dir: Path, *,
                    device: torch.device, amp_dtype: torch.dtype | None = None, channels_last: bool = False,
                    conf: float = 0.25, iou: float = 0.7) -> None:
    """PR_curve.png and confusion_matrix.png from `metrics`, and val_batch0_labels.jpg / val_batch0_pred.jpg:
    the first validation batch with its ground truth, and with the model's detections scoring at least `conf`
    (predict's default), to check the model by eye."""
    plot_pr_curves(metrics.pr50, run_dir / "PR_curve.png")
    if metrics.confusion is not None:
        plot_confusion_matrix(metrics.confusion, metrics.confusion_labels, run_dir / "confusion_matrix.png",
                              title=f"confusion matrix: scores >= {CONFUSION_CONF}, IoU > {CONFUSION_IOU}")
    model.eval()
    batch = next(iter(loader))
    results = _detect(model, batch.images, device=device, conf=conf, iou=iou, max_det=300, amp_dtype=amp_dtype,
                      channels_last=channels_last)
    rows = [torch.cat([torch.full((len(r.scores), 1), float(i)), r.classes[:, None].float().cpu(),
                       r.boxes_xyxy.float().cpu()], dim=1) for i, r in enumerate(results)]
    plot_batch(batch.images, batch.targets, names, run_dir / "val_batch0_labels.jpg")
    plot_batch(batch.images, torch.cat(rows), names, run_dir / "val_batch0_pred.jpg",
               scores=torch.cat([r.scores.float().cpu() for r in results]))


def to_coco(result, scale: torch.Tensor, pad: torch.Tensor, orig_size: torch.Tensor, image_id: int,
            category_ids: list[int]) -> list[dict]:
    """Map one image's detections from letterboxed input pixels back to the original image, COCO style."""
    boxes = (result.boxes_xyxy.float().cpu() - pad.repeat(2)) / scale
    height, width = (int(v) for v in orig_size)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    boxes[:, 2:] -= boxes[:, :2]
    # Rounded as tensors: value by value in Python this took 2.5 us per detection, and validation at conf 0.001
    # makes tens of thousands of them per pass (37,810 on coco128 at 320).
    xywh = torch.round(boxes.double(), decimals=3).tolist()
    scores = torch.round(result.scores.double().cpu(), decimals=5).tolist()
    return [{"image_id": image_id, "category_id": category_ids[c], "bbox": box, "score": s}
            for box, s, c in zip(xywh, scores, result.classes.cpu().tolist(), strict=True) if not math.isnan(s)]
