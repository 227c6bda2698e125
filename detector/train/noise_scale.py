"""The simple gradient noise scale B_simple = tr(Sigma) / |G|^2: a hint at the critical batch size.

Below about B_simple images per optimizer step, a larger batch buys nearly proportionally fewer steps
to the same loss; far above it, a larger batch mostly adds compute per step (McCandlish et al. 2018,
"An Empirical Model of Large-Batch Training", section 2 and appendix A).

Neither tr(Sigma) (the summed variance of per-image gradients) nor |G|^2 (the squared norm of the true
gradient) is seen directly, but the squared norms of mean gradients over b_small and b_big images taken
in the same step give unbiased estimates of both:

    E|G_b|^2 = |G|^2 + tr(Sigma) / b
    |G|^2    ~ (b_big |G_big|^2 - b_small |G_small|^2) / (b_big - b_small)
    tr Sigma ~ (|G_small|^2 - |G_big|^2) / (1 / b_small - 1 / b_big)

Single estimates are very noisy, so both are smoothed by exponential moving averages before the ratio.
The ratio is reliable (within 20% on a noisy quadratic, tests/test_noise_scale.py) while B_simple is up
to about twice the larger measured batch; far beyond it the estimate only says "large" (or infinite).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class NoiseScale:
    """Running estimate of B_simple from pairs of gradient norms.

    Attributes:
        decay: weight of the past in the moving averages (per update).
        updates: pairs seen so far.
    """

    decay: float = 0.95
    updates: int = 0
    _gradient_sq: float = 0.0  # moving average of the |G|^2 estimates
    _trace: float = 0.0  # moving average of the tr(Sigma) estimates

    def update(self, small_sq: float, big_sq: float, small_batch: int, big_batch: int) -> None:
        """Add one step's measurement.

        Args:
            small_sq: squared norm of the mean gradient over `small_batch` images.
            big_sq: squared norm of the mean gradient over `big_batch` images (a superset of the small
                ones, or independent of them).
            small_batch, big_batch: the two batch sizes, small_batch < big_batch.
        """
        if not 0 < small_batch < big_batch:
            raise ValueError(f"need 0 < small_batch < big_batch, got {small_batch} and {big_batch}")
        gradient_sq = (big_batch * big_sq - small_batch * small_sq) / (big_batch - small_batch)
        trace = (small_sq - big_sq) / (1 / small_batch - 1 / big_batch)
        self._gradient_sq = self.decay * self._gradient_sq + (1 - self.decay) * gradient_sq
        self._trace = self.decay * self._trace + (1 - self.decay) * trace
        self.updates += 1

    @property
    def value(self) -> float | None:
        """B_simple in images; None before any update.

        Infinite while the |G|^2 average is not positive: at the batch sizes measured the gradient's
        signal is still below its noise, so the noise scale is beyond what they resolve. (The bias of the
        zero-started averages cancels in the ratio.)
        """
        if self.updates == 0:
            return None
        if self._gradient_sq <= 0:
            return math.inf
        return max(self._trace, 0.0) / self._gradient_sq


def squared_gradient_norm(model: nn.Module) -> float:
    """Sum of the squared gradients of every parameter (one host sync)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.stack(torch._foreach_norm(grads)).square().sum()) if grads else 0.0


class GradientNoiseProbe:
    """Measures B_simple during training without changing it.

    The trainer's loss is the batch mean times the batch size, so .grad holds the sum of the per-image
    gradients seen since the last optimizer step. With gradient accumulation that gives both norms for
    free: after the first batch of a window .grad is b_small times the mean over that batch, and just
    before the optimizer step it is N times the mean over the whole window of N images (a superset).
    Without accumulation (one batch per step) the step's gradient is paired with the gradient of the
    batch's first half, computed on a shadow copy of the current weights so training never sees the
    extra pass (its batch-norm statistics still come from whole batches); that costs about half a step
    every `every` steps and is recorded in `seconds` so timings can leave it out.

    Args:
        every: without accumulation, measure at every `every`-th step.
        decay: smoothing of the NoiseScale averages (per measurement).
    """

    def __init__(self, every: int = 2, decay: float = 0.98):
        self.every, self.seen = every, 0
        self.estimate = NoiseScale(decay=decay)
        self.shadow: nn.Module | None = None
        self.seconds: list[tuple[int, float]] = []  # (iteration, seconds) of each shadow pass, to subtract
        self._first: tuple[float, int] | None = None  # (|G_small|^2, b_small) of the open window
        self._window_images = 0

    def observe(self, ctx, images: torch.Tensor, targets: torch.Tensor, *, first: bool, last: bool) -> None:
        """Called by engine.train_step after each batch's backward; `first`/`last`: the batch opens/closes
        an accumulation window (the optimizer steps right after a `last` batch)."""
        batch = len(images)
        scale = ctx.scaler.get_scale() if ctx.scaler.is_enabled() else 1.0
        if first and last:
            self.seen += 1
            if batch >= 2 and not (self.seen - 1) % self.every:
                started = time.perf_counter()
                self._measure_half(ctx, images, targets, scale)
                self.seconds.append((ctx.state.iteration, time.perf_counter() - started))
            return
        if first:
            self._first = squared_gradient_norm(ctx.model) / (batch * scale) ** 2, batch
            self._window_images = batch
            return
        self._window_images += batch
        if last and self._first is not None:
            small_sq, small_batch = self._first
            big_sq = squared_gradient_norm(ctx.model) / (self._window_images * scale) ** 2
            self.estimate.update(small_sq, big_sq, small_batch, self._window_images)
            self._first = None

    def _measure_half(self, ctx, images: torch.Tensor, targets: torch.Tensor, scale: float) -> None:
        from detector.device import autocast, prepare_images

        batch = len(images)
        big_sq = squared_gradient_norm(ctx.model) / (batch * scale) ** 2
        if self.shadow is None:
            self.shadow = copy.deepcopy(ctx.model)
        self.shadow.load_state_dict(ctx.model.state_dict())
        self.shadow.zero_grad(set_to_none=True)
        half = batch // 2
        rows = targets[targets[:, 0] < half].to(ctx.device)
        with autocast(ctx.device, ctx.amp_dtype):
            loss, _ = ctx.criterion(self.shadow(prepare_images(images[:half], ctx.device, ctx.channels_last)), rows,
                                    half)
        if not torch.isfinite(loss):
            return
        (loss * scale).backward()
        small_sq = squared_gradient_norm(self.shadow) / (half * scale) ** 2
        self.shadow.zero_grad(set_to_none=True)
        self.estimate.update(small_sq, big_sq, half, batch)
