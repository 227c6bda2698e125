"""AutoBatch: measure real training steps at a few batch sizes, fit memory, choose, verify.

No knowledge of datasets or models: it is given `step(b)`, one real step at batch b (training's by
detector/train/probe.py, inference's by detector/inference/predict.py), and a memory probe
(detector/autobatch/memory.py). It warms up at the start batch
(cudnn.benchmark, allocator pools, optimizer state); samples b = start, 2*start, ... until a step runs
out of memory, passes the budget (fraction * capacity), would pass max_batch or the time budget, or
(measuring throughput, the CPU case) stops raising images/s by more than 5%; fits peak = fixed +
per_image * b by least squares; chooses the largest batch whose predicted peak fits (capped at
max_batch, rounded down to a multiple of 8 from 16 up), or when measuring throughput the smallest
sampled batch within 5% of the best images/s that fits; and verifies the choice with VERIFY_STEPS real
steps in a row, backing off while their peak does not fit. Bytes everywhere; the log line says GiB (2**30
bytes).
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from collections.abc import Callable

from detector.autobatch.memory import MemoryProbe
from detector.autobatch.records import VERIFY_TOLERANCE, Decision, Fit, Sample, fit_memory, gib
from detector.errors import DetectorError

logger = logging.getLogger(__name__)

MIN_R2 = 0.95  # below this the line does not describe the samples and its prediction is not trusted
MAX_BACK_OFFS = 3
# One cold step is not steady state: on CUDA the first step at a new size picks cuDNN algorithms and fills the
# allocator's cache, and where the blocks of one step land shapes where the next step's fit. The verification
# runs this many steps in a row (no cache release between them) and keeps the highest peak.
VERIFY_STEPS = 3
THROUGHPUT_TOLERANCE = 0.05  # images/s within 5% of the best count as "as fast"


class AutoBatchError(DetectorError):
    """AutoBatch cannot choose any batch (e.g. a single step at the start batch runs out of memory)."""


def round_batch(batch: int) -> int:
    """Round down to a multiple of 8 from 16 up (kernels and tensor cores like multiples of 8)."""
    return batch - batch % 8 if batch >= 16 else batch


TIMED_RUNS = 3  # unwatched runs per sample when images/s matters; the fastest counts


def measure(step: Callable[[int], None], probe: MemoryProbe, batch: int, *, steps: int = 1, timed_runs: int = 0,
            clock: Callable[[], float] = time.perf_counter) -> Sample:
    """Run step(batch) `steps` times in a row under one probe reset; return the peak over them and the mean
    time of one, or the OOM one of them raised.

    Args:
        steps: consecutive watched runs, with nothing released between them (as in training), so the
            peak is the highest any of them reached.
        timed_runs: time this many more, unwatched runs and keep the fastest (the CPU tracker's per-op
            bookkeeping costs a roughly constant time per step, which would make small batches look slow,
            and on a shared CPU one run can take twice as long as the next: a single slow sample once
            stopped sampling at b=4 and chose b=2, which then trained 30% slower than b=8).

    Raises:
        Exception: whatever step raised when the probe does not call it out-of-memory.
    """
    error = None
    probe.reset()
    try:
        with probe.watch():
            started = clock()
            for _ in range(steps):
                step(batch)
            seconds = (clock() - started) / steps
        peak = probe.peak()
        for run in range(timed_runs):
            started = clock()
            step(batch)
            seconds = clock() - started if run == 0 else min(seconds, clock() - started)
    except Exception as err:
        if not probe.is_oom(err):
            raise
        error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
        # The traceback's frames hold the step's activations; drop them before cleaning up.
        traceback.clear_frames(err.__traceback__)
    if error is not None:
        # Outside the except block the exception and its frames are gone, so memory can really be freed.
        probe.cleanup()
        logger.debug("AutoBatch: b=%d ran out of memory: %s", batch, error)
        return Sample(batch, None, None, error, steps=steps)
    return Sample(batch, peak, seconds, steps=steps)


def _sample(step: Callable[[int], None], probe: MemoryProbe, *, budget: int, start: int, max_batch: int,
            max_samples: int, deadline: float, measure_throughput: bool,
            clock: Callable[[], float]) -> tuple[list[Sample], str]:
    """Sample b = start, 2*start, ... until a stop condition; returns the samples and why sampling stopped."""
    samples: list[Sample] = []
    batch, cost = start, 0.0
    while True:
        if len(samples) >= max_samples:
            return samples, f"{max_samples} samples taken"
        if batch > max_batch:
            return samples, f"next batch {batch} > max batch {max_batch}"
        good = [s for s in samples if s.ok]
        if len(good) >= 2 and clock() + 2 * cost > deadline:
            return samples, "time budget spent"  # doubling the batch about doubles the time of a sample
        began = clock()
        sample = measure(step, probe, batch, timed_runs=TIMED_RUNS if measure_throughput else 0, clock=clock)
        cost = clock() - began
        samples.append(sample)
        if not sample.ok:
            return samples, f"out of memory at b={batch}"
        if sample.peak_bytes > budget:
            return samples, f"peak {gib(sample.peak_bytes)} GiB at b={batch} passed the target"
        if measure_throughput and len(good) >= 1:
            best = max(s.images_per_second for s in good)
            if sample.images_per_second <= best * (1 + THROUGHPUT_TOLERANCE):
                return samples, f"images/s stopped improving by more than 5% at b={batch}"
        batch *= 2


def _memory_choice(fit: Fit, budget: int, max_batch: int, samples: list[Sample]) -> tuple[int, str]:
    """Largest batch whose predicted peak fits the budget, below any batch that ran out of memory,
    capped at max_batch and rounded; and which limit bound it."""
    fitting = fit.largest_fitting(budget)
    failed = [s.batch for s in samples if not s.ok]
    if failed and min(failed) - 1 < min(fitting, max_batch):
        return round_batch(min(failed) - 1), "memory"  # the device said no below the line's limit
    if fitting >= max_batch:
        return round_batch(max_batch), "dataset size"
    return round_batch(fitting), "memory"


def _throughput_choice(samples: list[Sample], budget: int, memory_batch: int,
                       stopped: str) -> tuple[int, str] | None:
    """Smallest sampled batch within 5% of the best images/s, and why; None when the fastest batch does
    not fit the memory choice (images/s was still rising where memory stopped it: memory decides)."""
    ran = [s for s in samples if s.ok]
    best = max(ran, key=lambda s: s.images_per_second)
    if best.peak_bytes > budget or best.batch > memory_batch:
        return None
    threshold = best.images_per_second * (1 - THROUGHPUT_TOLERANCE)
    chosen = min((s for s in ran if s.images_per_second >= threshold and s.batch <= best.batch),
                 key=lambda s: s.batch)
    reason = (f"{chosen.images_per_second:.3g} img/s, within 5% of the best {best.images_per_second:.3g}"
              f" at b={best.batch}; sampling stopped: {stopped}")
    return chosen.batch, reason


def _fallback(samples: list[Sample], budget: int, max_batch: int, why: str) -> tuple[int, str, int | None]:
    """The largest measured batch that fit the budget (safe: it ran), else 1; with the reason."""
    fitting = [s for s in samples if s.ok and s.peak_bytes <= budget and s.batch <= max_batch]
    if fitting:
        best = max(fitting, key=lambda s: s.batch)
        return best.batch, f"{why}; using the largest measured batch that fit", best.peak_bytes
    return 1, f"{why}; no measured batch fit the target, using batch 1", None


def _back_off(batch: int, check: Sample, fit: Fit, budget: int) -> int:
    """A smaller batch after a failed check: along the measured bytes per image, or by 20% after an OOM."""
    if check.ok:
        # The fit under-predicted here; the check's own bytes per image (above the fixed part) are the
        # better slope for the way down, and never smaller than the fit's.
        per_image = max((check.peak_bytes - fit.fixed_bytes) / batch, fit.per_image_bytes)
        smaller = math.floor((budget - fit.fixed_bytes) / per_image)
    else:
        smaller = math.floor(batch * 0.8)
    return round_batch(max(min(smaller, batch - 1), 1))


def _verify(step: Callable[[int], None], probe: MemoryProbe, batch: int, fit: Fit, budget: int,
            samples: list[Sample], steps: int, clock: Callable[[], float]) -> tuple[int | None, list[Sample]]:
    """Run `steps` real steps in a row at `batch` and back off until their peak fits.

    Returns the verified batch (None if MAX_BACK_OFFS back-offs did not fit) and the checks run.
    """
    checks: list[Sample] = []
    for _ in range(MAX_BACK_OFFS + 1):
        # With one step, a sample at exactly this batch was the same step under the same reset: it is the check.
        check = next((s for s in samples if s.batch == batch and s.ok), None) if steps == 1 else None
        if check is None:
            check = measure(step, probe, batch, steps=steps, clock=clock)
            checks.append(check)
        if check.ok and check.peak_bytes <= budget * VERIFY_TOLERANCE:
            return batch, checks
        if batch == 1:
            break
        smaller = _back_off(batch, check, fit, budget)
        logger.info("AutoBatch: b=%d %s; backing off to b=%d", batch,
                    "ran out of memory" if not check.ok else f"peaked at {gib(check.peak_bytes)} GiB", smaller)
        batch = smaller
    return None, checks


def choose_batch(step: Callable[[int], None], probe: MemoryProbe, *, fraction: float, max_batch: int,
                 measure_throughput: bool, start: int = 1, max_samples: int = 8, time_budget_s: float = 15.0,
                 verify_steps: int = VERIFY_STEPS, image_size: int | None = None,
                 clock: Callable[[], float] = time.perf_counter, label: str = "") -> Decision:
    """Sample, fit, choose and verify a training batch size (see the module docstring for the method).

    Args:
        step: one full training step at batch b (on CUDA it synchronizes before returning).
        probe: reads peak memory and capacity of the training device.
        fraction: share of the capacity the peak may fill, in (0, 1); max_batch: the largest useful batch.
        measure_throughput: also time steps and prefer the smallest batch within 5% of the best images/s (CPU).
        start, max_samples: the first sampled batch (later samples double it) and the most samples.
        time_budget_s: no sample starts that would end past it, but a fit always gets its two samples.
        verify_steps: steps in a row at the chosen batch that verify it (the highest peak counts).
        image_size, label: named in the error and the log line; clock: seconds counter (tests inject one).

    Raises:
        ValueError: arguments out of range. AutoBatchError: not even the start batch fits. Any non-memory
        error `step` raises (a broken model is not a batch-size problem).
    """
    if not 0 < fraction < 1:
        raise ValueError(f"AutoBatch fraction must be in (0, 1), got {fraction}")
    if max_batch < 1 or start < 1 or verify_steps < 1:
        raise ValueError(f"AutoBatch needs max_batch, start and verify_steps >= 1, got {max_batch}, {start} and "
                         f"{verify_steps}")
    began = clock()
    start = min(start, max_batch)
    _warm_up(step, probe, start, image_size=image_size, label=label, clock=clock)
    capacity = probe.capacity()
    budget = int(fraction * capacity)
    samples, stopped = _sample(step, probe, budget=budget, start=start, max_batch=max_batch,
                               max_samples=max_samples, deadline=began + time_budget_s,
                               measure_throughput=measure_throughput, clock=clock)
    fit = fit_memory(samples)
    decision = Decision(batch=1, fraction=fraction, capacity_bytes=capacity, budget_bytes=budget, samples=samples,
                        fixed_bytes=fit and fit.fixed_bytes, per_image_bytes=fit and fit.per_image_bytes,
                        r2=fit and fit.r2, fit_batches=fit.batches if fit else [], decided_by="fallback",
                        verified_peak_bytes=None, reason="",
                        throughput=measure_throughput, device=probe.name, label=label)
    why_not = _why_not_trusted(fit, budget, samples)
    if why_not:
        decision.batch, decision.reason, decision.verified_peak_bytes = _fallback(samples, budget, max_batch, why_not)
    else:
        _choose_and_verify(decision, step, probe, fit, max_batch, stopped, verify_steps, clock)
    decision.seconds = clock() - began
    log = logger.warning if decision.decided_by == "fallback" else logger.info
    log(decision.log_line())
    return decision


def _warm_up(step: Callable[[int], None], probe: MemoryProbe, start: int, *, image_size: int | None, label: str,
             clock: Callable[[], float]) -> None:
    """One step at the start batch (cudnn.benchmark, allocator pools, optimizer state), or the error that not even
    that fits."""
    warm = measure(step, probe, start, clock=clock)
    probe.reset()
    if not warm.ok:
        at_size = f" at imgsz {image_size}" if image_size else ""
        raise AutoBatchError(f"one {label or 'measured'} step at batch {start} already runs out of memory{at_size} on "
                             f"{probe.name}, where this process has {gib(probe.capacity())} GiB ({warm.error}); "
                             "use a smaller imgsz or model")


def _why_not_trusted(fit: Fit | None, budget: int, samples: list[Sample]) -> str | None:
    """Why the fit cannot be used to choose (None when it can)."""
    if fit is None:
        return f"only {sum(s.ok for s in samples)} sample(s) ran, a fit needs 2"
    if fit.per_image_bytes <= 0:
        return "the peak did not grow with the batch, so the fit cannot place a limit"
    if fit.r2 < MIN_R2:
        return f"the fit is poor (R^2 {fit.r2:.3f} < {MIN_R2})"
    if fit.largest_fitting(budget) < 1:
        return f"the fit predicts that even batch 1 needs more than the target {gib(budget)} GiB"
    return None


def _choose_and_verify(decision: Decision, step: Callable[[int], None], probe: MemoryProbe, fit: Fit,
                       max_batch: int, stopped: str, verify_steps: int, clock: Callable[[], float]) -> None:
    """Fill decision.batch / decided_by / reason / verified peak / checks from a trusted fit."""
    budget, samples = decision.budget_bytes, decision.samples
    batch, decided_by = _memory_choice(fit, budget, max_batch, samples)
    reason = f"predicted peak {gib(fit.predict(batch))} GiB; sampling stopped: {stopped}"
    fastest = _throughput_choice(samples, budget, batch, stopped) if decision.throughput else None
    if fastest is not None and fastest[0] < batch:
        batch, decided_by, reason = fastest[0], "throughput", fastest[1]
    verified, decision.checks = _verify(step, probe, batch, fit, budget, samples, verify_steps, clock)
    if verified is None:
        decision.batch, decision.reason, decision.verified_peak_bytes = _fallback(
            samples, budget, max_batch, f"b={batch} and {MAX_BACK_OFFS} back-offs did not fit the target")
        return
    if verified != batch:
        reason += f"; backed off from b={batch} after verification"
    peaks = [s.peak_bytes for s in samples + decision.checks if s.batch == verified and s.ok]
    decision.batch, decision.decided_by, decision.reason = verified, decided_by, reason
    decision.verified_peak_bytes, decision.verified_steps = peaks[-1], verify_steps
