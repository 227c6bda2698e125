"""What AutoBatch measures and concludes: samples, the memory fit, and the decision with its log line.

Bytes everywhere; the log line says GiB (2**30 bytes).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

GIB = 2**30
VERIFY_TOLERANCE = 1.03  # a verified peak may pass the budget by 3% (the budget is a fraction, not the wall)
FIT_POINTS = 3  # the line is fitted to the largest samples (see fit_memory)


@dataclass
class Sample:
    """One measured training step.

    Attributes:
        batch: images in the step.
        peak_bytes: peak memory of the step (bytes), None when it failed.
        seconds: wall time of the step (s), None when it failed.
        error: the out-of-memory message when the step failed, else None.
        steps: steps run in a row under one reset; peak_bytes is the highest of them, seconds their mean.
    """

    batch: int
    peak_bytes: int | None
    seconds: float | None
    error: str | None = None
    steps: int = 1

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def images_per_second(self) -> float | None:
        if not self.ok or not self.seconds:
            return None
        return self.batch / self.seconds


@dataclass
class Fit:
    """peak_bytes = fixed_bytes + per_image_bytes * batch, and how well it describes the samples (R^2)."""

    fixed_bytes: float
    per_image_bytes: float
    r2: float
    batches: list[int] = field(default_factory=list)  # the sampled batches the line was fitted to

    def predict(self, batch: int) -> float:
        return self.fixed_bytes + self.per_image_bytes * batch

    def largest_fitting(self, budget_bytes: int) -> int:
        return math.floor((budget_bytes - self.fixed_bytes) / self.per_image_bytes)


@dataclass
class Decision:
    """What AutoBatch chose and every number behind it (saved as autobatch.json).

    Attributes:
        batch: the chosen batch size.
        fraction: target fraction of capacity.
        capacity_bytes: memory this process can use (bytes).
        budget_bytes: fraction * capacity (bytes).
        samples: the sampled steps, in order.
        fixed_bytes, per_image_bytes, r2: the fit, None when there was none.
        fit_batches: the sampled batches the fit used (the largest that ran).
        label: what the batch is for (log line only).
        decided_by: "memory", "throughput", "dataset size" or "fallback".
        verified_peak_bytes: highest peak of `verified_steps` real steps in a row at `batch` (bytes).
        verified_steps: how many steps verified_peak_bytes covers (1 for a fallback's sample).
        first_epoch_peak_bytes: peak of training's first epoch at `batch` (bytes), None until the trainer
            records it (record_first_epoch).
        reason: why this batch, in words.
        checks: verification steps run after the choice (back-offs included).
        throughput: whether images/s took part in the choice.
        device: the probe's name.
        seconds: time spent deciding (s).
    """

    batch: int
    fraction: float
    capacity_bytes: int
    budget_bytes: int
    samples: list[Sample]
    fixed_bytes: float | None
    per_image_bytes: float | None
    r2: float | None
    decided_by: str
    verified_peak_bytes: int | None
    reason: str
    checks: list[Sample] = field(default_factory=list)
    verified_steps: int = 1
    first_epoch_peak_bytes: int | None = None
    fit_batches: list[int] = field(default_factory=list)
    label: str = ""  # what the batch is for, e.g. "training" or "validation" (shown in the log line)
    throughput: bool = False
    device: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Decision:
        """The inverse of to_dict (a decision read back from autobatch.json)."""
        samples = [Sample(**s) for s in data["samples"]]
        checks = [Sample(**s) for s in data.get("checks", [])]
        return cls(**{**data, "samples": samples, "checks": checks})

    def log_line(self) -> str:
        """One line a person can check: samples, fit, target, choice and what decided it, verified peak."""
        marks = [f"{s.batch}" + ("(OOM)" if not s.ok else "(>target)" if s.peak_bytes > self.budget_bytes else "")
                 for s in self.samples]
        line = f"AutoBatch{f' ({self.label})' if self.label else ''}: samples b={','.join(marks)}"
        if self.throughput:
            line += f" at {','.join(f'{s.images_per_second:.3g}' for s in self.samples if s.ok)} img/s"
        if self.per_image_bytes is not None:
            line += (f" -> fit on b={','.join(map(str, self.fit_batches))}: {gib(self.fixed_bytes)} GiB"
                     f" + {gib(self.per_image_bytes)} GiB/img"
                     f" (R^2 {self.r2:.4f})")
        line += (f"; target {self.fraction:.0%} of {gib(self.capacity_bytes)} GiB = {gib(self.budget_bytes)} GiB"
                 f" -> batch {self.batch} ({self.decided_by}")
        line += f": {self.reason})" if self.decided_by in ("fallback", "throughput") else ")"
        if self.verified_peak_bytes is not None:
            steps = f" over {self.verified_steps} steps" if self.verified_steps > 1 else ""
            line += f", verified peak {gib(self.verified_peak_bytes)} GiB{steps}"
        backed_off = sum(1 for c in self.checks if not c.ok or c.peak_bytes > self.budget_bytes * VERIFY_TOLERANCE)
        if backed_off:
            line += f" after {backed_off} back-off(s)"
        return line + f" [{self.device}, {self.seconds:.1f} s]"

    def record_first_epoch(self, peak_bytes: int) -> str:
        """Keep the peak training's first epoch reached at this batch; returns a line comparing it with the target."""
        self.first_epoch_peak_bytes = peak_bytes
        verified = "" if self.verified_peak_bytes is None else f", verified {gib(self.verified_peak_bytes)} GiB"
        return (f"AutoBatch{f' ({self.label})' if self.label else ''}: the first epoch at batch {self.batch} peaked at "
                f"{gib(peak_bytes)} GiB, {peak_bytes / self.budget_bytes:.2f} of the target {gib(self.budget_bytes)} "
                f"GiB{verified}")


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.3g}"


def fit_memory(samples: list[Sample]) -> Fit | None:
    """Least-squares line peak = fixed + per_image * batch over the FIT_POINTS largest samples that ran.

    The smallest batches are left out on purpose: there the peak can be set by the optimizer step
    (gradients, momentum, EMA and their temporaries, a cost that does not grow with the batch) rather
    than by activations, so they sit above the line that larger batches follow and would flatten the
    slope that the choice extrapolates. None when fewer than two samples ran.
    """
    good = sorted((s for s in samples if s.ok), key=lambda s: s.batch)[-FIT_POINTS:]
    if len(good) < 2:
        return None
    batches = np.array([s.batch for s in good], dtype=np.float64)
    peaks = np.array([s.peak_bytes for s in good], dtype=np.float64)
    per_image, fixed = np.polyfit(batches, peaks, 1)
    residual = float(np.sum((peaks - (fixed + per_image * batches)) ** 2))
    total = float(np.sum((peaks - peaks.mean()) ** 2))
    r2 = 1.0 - residual / total if total > 0 else (1.0 if residual == 0 else 0.0)
    return Fit(float(fixed), float(per_image), r2, [s.batch for s in good])
