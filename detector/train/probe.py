"""The steps AutoBatch measures: the real training step (and the validation step), on copies, at the worst
case training will meet.

`make_probe_step` returns `step(b)`, which runs engine.whole_step (the training step without its
out-of-memory recovery, so a batch that does not fit fails: forward under the training AMP and
memory format, loss with the real assigner, backward, clipping, optimizer step, EMA update) on a deep
copy of the model, so the weights being trained never change. Inputs are random but shaped like the
worst batch: the largest image size and `max_boxes` boxes in every image, because the assigner's memory
grows with the boxes per image (dense datasets are where trainers run out of memory).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn

from detector.device import device_ops
from detector.train.engine import StepContext, whole_step
from detector.train.optim import ModelEMA, Schedule, build_optimizer


def worst_case_targets(batch: int, *, image_size: int, max_boxes: int, num_classes: int,
                       generator: torch.Generator) -> torch.Tensor:
    """Random plausible boxes, `max_boxes` in every image.

    Sides are log-uniform from 2% to 80% of the image (small and large objects both occur), and every
    box lies inside the image.

    Returns:
        float32 (batch * max_boxes, 6) rows [batch_index, class, x1, y1, x2, y2] in input pixels.
    """
    n = batch * max_boxes
    log_side = torch.empty(n, 2).uniform_(math.log(0.02), math.log(0.8), generator=generator)
    sides = (log_side.exp() * image_size).clamp_(min=2.0)  # (n, 2) width, height
    corners = torch.rand(n, 2, generator=generator) * (image_size - sides)  # x1, y1 keep the box inside
    image_index = torch.arange(batch).repeat_interleave(max_boxes).float()
    classes = torch.randint(num_classes, (n,), generator=generator).float()
    return torch.cat([image_index[:, None], classes[:, None], corners, corners + sides], dim=1)


def make_probe_step(model: nn.Module, criterion: nn.Module, *, image_size: int, max_boxes: int, num_classes: int,
                    device: torch.device | str, amp_dtype: torch.dtype | None = None, channels_last: bool = False,
                    optimizer_name: str = "SGD", ema: bool = True, grad_clip: float = 10.0, seed: int = 0,
                    inputs: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None
                    ) -> Callable[[int], None]:
    """A function that runs one full training step at batch b on copies of the model.

    The copies, the optimizer (so its state, e.g. momentum buffers, is counted from the second step on)
    and the EMA are made once here and live as long as the returned function; drop it when done.

    Args:
        model: the detector to be trained; it is copied, never changed.
        criterion: the training loss, called as criterion(outputs, targets, batch) -> (loss, items).
        image_size: the largest side training will use (pixels; multi-scale included).
        max_boxes: the most boxes of any training image (>= 1).
        num_classes: classes of the dataset.
        device: the training device.
        amp_dtype: autocast dtype of training, None for full precision.
        channels_last: whether training uses the channels-last memory format.
        optimizer_name, ema, grad_clip: the optimizer ("SGD" or "AdamW"), EMA and clipping of training.
        seed: seed of the random inputs (the same inputs at every call make samples comparable).
        inputs: inputs(b) -> (uint8 images (b, 3, S, S), targets (N, 6)) instead of the random worst case.

    Returns:
        step(b): runs the step on b images; on CUDA it synchronizes before returning.
    """
    if max_boxes < 1 or image_size < 32:
        raise ValueError(f"probe step needs max_boxes >= 1 and image_size >= 32, got {max_boxes}, {image_size}")
    device = torch.device(device)
    ops = device_ops(device)
    ctx = _probe_context(model, criterion, device=device, amp_dtype=amp_dtype, channels_last=channels_last,
                         optimizer_name=optimizer_name, ema=ema, grad_clip=grad_clip)

    def step(batch: int) -> None:
        ctx.optimizer.zero_grad(set_to_none=True)  # a step that ran out of memory may have left gradients
        if inputs is not None:
            images, targets = inputs(batch)
        else:
            generator = torch.Generator().manual_seed(seed)
            # uint8 on the host, like a loader's batch: train_step copies and converts it as in training.
            images = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8,
                                   generator=generator)
            targets = worst_case_targets(batch, image_size=image_size, max_boxes=max_boxes,
                                         num_classes=num_classes, generator=generator)
        if whole_step(ctx, images, targets) is None:
            raise RuntimeError("AutoBatch probe step: the loss was not finite, so backward was not measured")
        ops.synchronize()  # the caller's clock must see the whole step

    return step


def _probe_context(model: nn.Module, criterion: nn.Module, *, device: torch.device, amp_dtype: torch.dtype | None,
                   channels_last: bool, optimizer_name: str, ema: bool, grad_clip: float) -> StepContext:
    """A training context on a copy of the model, with the run's optimizer kind, EMA, AMP and a rank-local loss."""
    net = copy.deepcopy(model).to(device).train()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    # lr is tiny: the copy's weights do not matter, and random data must not drive them to inf.
    optimizer = build_optimizer(net, name=optimizer_name, lr=1e-6, momentum=0.9, weight_decay=5e-4)
    schedule = Schedule(lr0=1e-6, lrf=1.0, epochs=1, iters_per_epoch=1, warmup_iters=0, warmup_bias_lr=0.0,
                        warmup_momentum=0.9, momentum=0.9, accumulate=1)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return StepContext(model=net, criterion=criterion.rank_local(), optimizer=optimizer, schedule=schedule,
                       scaler=scaler, ema=ModelEMA(net) if ema else None, device=device, amp_dtype=amp_dtype,
                       channels_last=channels_last, grad_clip=grad_clip)
