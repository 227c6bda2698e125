"""AutoBatch's sampling, fit, choice and verification against a fake device with a known memory model."""

import contextlib
import json
import math
import weakref

import numpy as np
import pytest

from detector.autobatch.choose import AutoBatchError, choose_batch, round_batch
from detector.autobatch.records import Sample, fit_memory

GIB = 2**30


class FakeOOM(RuntimeError):
    """What the fake device raises at its wall."""


class _Activations:
    """Stands in for a step's activations, so a test can see whether a failed step was released."""


class FakeDevice:
    """A device whose step at batch b peaks at fixed + per_image * b (+ noise, + an optional bend).

    It is both the step function and the memory probe, and records what AutoBatch did to it.
    """

    name = "fake"

    def __init__(self, *, fixed=0.5 * GIB, per_image=0.08 * GIB, capacity=80 * GIB, wall=None, noise=0.0,
                 bend_above=None, bend=0.0, seconds=None, seed=0):
        self.fixed, self.per_image, self.capacity_bytes = fixed, per_image, capacity
        self.wall, self.bend_above, self.bend, self.seconds = wall, bend_above, bend, seconds
        self.rng = np.random.default_rng(seed)
        self.noise = noise
        self.now = 0.0
        self.calls: list[int] = []
        self.events: list[str] = []
        self.peak_bytes = 0
        self.failed_step_alive_at_cleanup: list[bool] = []
        self._failed_activations = None

    def true_peak(self, batch: int) -> float:
        peak = self.fixed + self.per_image * batch
        if self.bend_above is not None and batch > self.bend_above:
            peak += self.bend * self.per_image * (batch - self.bend_above) ** 2 / self.bend_above
        return peak

    # the step
    def __call__(self, batch: int) -> None:
        self.calls.append(batch)
        self.events.append(f"step {batch}")
        activations = _Activations()
        if self.seconds is not None:
            self.now += self.seconds(batch)
        if (self.wall is not None and batch >= self.wall) or self.true_peak(batch) > self.capacity_bytes:
            self._failed_activations = weakref.ref(activations)
            raise FakeOOM(f"out of memory at batch {batch}")
        self.peak_bytes = int(self.true_peak(batch) * (1 + self.noise * self.rng.standard_normal()))

    def clock(self) -> float:
        return self.now

    # the probe
    def reset(self) -> None:
        self.events.append("reset")
        self.peak_bytes = 0

    def watch(self):
        return contextlib.nullcontext()

    def peak(self) -> int:
        return self.peak_bytes

    def capacity(self) -> int:
        return int(self.capacity_bytes)

    def is_oom(self, err: BaseException) -> bool:
        return isinstance(err, FakeOOM)

    def cleanup(self) -> None:
        self.events.append("cleanup")
        if self._failed_activations is not None:
            self.failed_step_alive_at_cleanup.append(self._failed_activations() is not None)


def run(device: FakeDevice, *, fraction=0.6, max_batch=100_000, measure_throughput=False, **kwargs):
    return choose_batch(device, device, fraction=fraction, max_batch=max_batch,
                        measure_throughput=measure_throughput, clock=device.clock, **kwargs)


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9])
def test_chooses_the_largest_batch_that_fits(fraction):
    device = FakeDevice(noise=0.001, seed=int(fraction * 10))
    decision = run(device, fraction=fraction)
    budget = fraction * 80 * GIB
    largest = math.floor((budget - 0.5 * GIB) / (0.08 * GIB))  # from the true line, not the fit
    assert decision.batch == largest - largest % 8
    assert decision.decided_by == "memory"
    assert decision.per_image_bytes == pytest.approx(0.08 * GIB, rel=0.01)
    assert decision.r2 > 0.999
    assert decision.verified_peak_bytes <= budget
    assert device.true_peak(decision.batch + 8) > budget  # the next multiple of 8 would not fit
    assert device.calls[-1] == decision.batch  # the choice was run for real


def test_oom_during_sampling_stops_sampling_and_cleans_up():
    device = FakeDevice(wall=64)
    decision = run(device, fraction=0.9)
    assert [s.batch for s in decision.samples] == [1, 2, 4, 8, 16, 32, 64]
    assert decision.samples[-1].error is not None and decision.samples[-1].peak_bytes is None
    # Cleanup ran right after the failed step, and by then its frames (and activations) were released.
    failed = device.events.index("step 64")
    assert device.events[failed + 1] == "cleanup"
    assert device.failed_step_alive_at_cleanup == [False]
    # The choice stays below the batch that failed, and it was verified.
    assert decision.batch == 56 and decision.decided_by == "memory"
    assert device.calls[-1] == 56 and decision.verified_peak_bytes == int(device.true_peak(56))


def test_wrong_fit_is_caught_by_verification_and_backed_off():
    # Linear up to b=128 (the sampled range), then memory bends upward: the line under-predicts.
    device = FakeDevice(bend_above=128, bend=0.5)
    decision = run(device, fraction=0.6)
    budget = decision.budget_bytes
    line_choice = round_batch(math.floor((budget - 0.5 * GIB) / (0.08 * GIB)))
    assert device.true_peak(line_choice) > budget * 1.03  # the setup really fools the fit
    assert len(decision.checks) >= 2 and decision.checks[0].batch == line_choice
    assert decision.batch < line_choice
    assert decision.verified_peak_bytes <= budget * 1.03
    assert decision.verified_peak_bytes == int(device.true_peak(decision.batch))
    assert "back-off" in decision.log_line()


def test_oom_at_verification_backs_off_by_a_fifth():
    device = FakeDevice(wall=300)  # sampling (up to 128) never meets the wall, the choice (592) does
    decision = run(device, fraction=0.6)
    assert [c.batch for c in decision.checks] == [592, 472, 376, 296]
    assert [c.ok for c in decision.checks] == [False, False, False, True]
    assert decision.batch == 296 and device.failed_step_alive_at_cleanup == [False] * 3


def test_throughput_picks_smallest_batch_within_five_percent_of_best():
    rates = {1: 10.0, 2: 18.0, 4: 30.0, 8: 40.0, 16: 41.0, 32: 41.5}  # images/s
    device = FakeDevice(seconds=lambda b: b / rates.get(b, 90.0))
    decision = run(device, fraction=0.6, measure_throughput=True, max_batch=1000)
    # 16 improved on 8 by 2.5% (< 5%), so sampling stopped there; 8 is within 5% of the best (41).
    assert [s.batch for s in decision.samples] == [1, 2, 4, 8, 16]
    assert [round(s.images_per_second, 3) for s in decision.samples] == [10, 18, 30, 40, 41]
    assert decision.batch == 8 and decision.decided_by == "throughput"
    assert "img/s" in decision.log_line() and "(throughput" in decision.log_line()


def test_throughput_choice_still_respects_memory():
    rates = {1: 10.0, 2: 20.0, 4: 40.0, 8: 80.0, 16: 160.0}
    device = FakeDevice(fixed=0.1 * GIB, per_image=0.1 * GIB, capacity=2 * GIB,
                        seconds=lambda b: b / rates.get(b, 90.0))
    decision = run(device, fraction=0.5, measure_throughput=True)  # budget 1 GiB: 9 images by the line
    assert decision.samples[-1].batch == 16 and decision.samples[-1].peak_bytes > decision.budget_bytes
    assert decision.batch == 9 and decision.decided_by == "memory"


def test_fallback_when_fewer_than_two_samples_survive():
    device = FakeDevice(wall=2)
    decision = run(device)
    assert decision.batch == 1 and decision.decided_by == "fallback"
    assert "a fit needs 2" in decision.reason and decision.per_image_bytes is None
    assert "fallback" in decision.log_line() and "a fit needs 2" in decision.log_line()


def test_fallback_when_the_fit_is_poor():
    device = FakeDevice(per_image=0.0001 * GIB, noise=0.5, seed=3)
    decision = run(device)
    assert decision.r2 < 0.95 and decision.decided_by == "fallback" and "R^2" in decision.reason
    fitting = [s.batch for s in decision.samples if s.ok and s.peak_bytes <= decision.budget_bytes]
    assert decision.batch == max(fitting)


def test_oom_at_the_start_batch_raises_with_a_reason():
    with pytest.raises(AutoBatchError, match="batch 1 already runs out of memory"):
        run(FakeDevice(wall=1))


def test_errors_that_are_not_oom_propagate():
    def broken(batch):
        raise ValueError("shape mismatch in the head")

    device = FakeDevice()
    with pytest.raises(ValueError, match="shape mismatch"):
        choose_batch(broken, device, fraction=0.6, max_batch=64, measure_throughput=False)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -1.0, 1.5])
def test_fraction_outside_zero_one_is_rejected(fraction):
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\)"):
        run(FakeDevice(), fraction=fraction)


def test_max_batch_caps_and_rounds_to_multiple_of_eight():
    decision = run(FakeDevice(), max_batch=100)
    assert decision.batch == 96 and decision.decided_by == "dataset size"
    assert max(s.batch for s in decision.samples) <= 100
    small = run(FakeDevice(), max_batch=12)
    assert small.batch == 12 and small.decided_by == "dataset size"
    assert [round_batch(b) for b in (1, 7, 15, 16, 23, 24, 593)] == [1, 7, 15, 16, 16, 24, 592]


def test_fit_uses_the_largest_samples_where_fixed_costs_flatten_the_small_ones():
    # Below b=4 the optimizer step's fixed cost sets the peak: a line through every sample would be too flat.
    peaks = {1: 150, 2: 150, 4: 128, 8: 156, 16: 212}
    fit = fit_memory([Sample(b, peak, 1.0) for b, peak in peaks.items()])
    assert fit.batches == [4, 8, 16]
    assert fit.per_image_bytes == pytest.approx(7) and fit.fixed_bytes == pytest.approx(100)


def test_fit_memory_recovers_the_line_and_needs_two_samples():
    samples = [Sample(b, int(100 + 7 * b), 1.0) for b in (1, 2, 4, 8)]
    fit = fit_memory(samples)
    assert fit.fixed_bytes == pytest.approx(100) and fit.per_image_bytes == pytest.approx(7)
    assert fit.r2 == pytest.approx(1.0)
    assert fit_memory(samples[:1] + [Sample(2, None, None, "OOM")]) is None


def test_log_line_and_json_hold_samples_fit_target_and_choice():
    decision = run(FakeDevice(), fraction=0.6)
    line = decision.log_line()
    assert line.startswith("AutoBatch: samples b=1,2,4,8,16,32,64,128 -> fit on b=32,64,128: 0.5 GiB + 0.08 GiB/img"
                           " (R^2 1.0000)")
    assert "target 60% of 80 GiB = 48 GiB -> batch 592 (memory), verified peak 47.9 GiB" in line
    saved = json.loads(json.dumps(decision.to_dict()))
    assert saved["batch"] == 592 and len(saved["samples"]) == 8 and saved["verified_peak_bytes"] > 0


def test_time_budget_stops_sampling_before_a_sample_would_end_past_it():
    device = FakeDevice(seconds=lambda b: float(b))  # 1 s per image
    decision = run(device, time_budget_s=10.0)
    # warm-up ends at 1 s, b=1 at 2 s, b=2 at 4 s, b=4 at 8 s; b=8 would end near 16 s > 10 s.
    assert [s.batch for s in decision.samples] == [1, 2, 4]
    assert "time budget spent" in decision.reason
