"""The gradient noise scale estimator on a problem whose noise scale is known exactly."""

import numpy as np
import pytest

from detector.train.noise_scale import NoiseScale


@pytest.mark.parametrize(("sigma", "distance"), [(1.0, 1.0), (0.7, 1.0), (0.5, 2.0)])  # B_simple about 59, 29, 4
def test_recovers_the_noise_scale_of_a_noisy_quadratic(sigma, distance):
    # Measured with batches of 4 and 32: the estimate is this close while B_simple is within about twice
    # the larger batch; far beyond it (e.g. 940 from 4 and 32) it only says "large".
    # Per-image loss 1/2 |theta - x|^2 with x ~ N(mu, sigma^2 I) in d dimensions: the per-image gradient
    # is theta - x, so G = theta - mu and Sigma = sigma^2 I, hence B_simple = d sigma^2 / |theta - mu|^2.
    rng = np.random.default_rng(0)
    dims, small, big = 50, 4, 32
    mu = np.zeros(dims)
    theta = mu + distance * rng.standard_normal(dims) / np.sqrt(dims)  # |theta - mu| about `distance`
    truth = dims * sigma**2 / np.sum((theta - mu) ** 2)
    estimator = NoiseScale(decay=0.99)
    for _ in range(3000):
        x = mu + sigma * rng.standard_normal((big, dims))
        gradients = theta - x  # per image
        small_mean, big_mean = gradients[:small].mean(0), gradients.mean(0)  # the small batch is part of the big
        estimator.update(float(small_mean @ small_mean), float(big_mean @ big_mean), small, big)
    assert estimator.value == pytest.approx(truth, rel=0.2), (estimator.value, truth)


def test_no_value_before_data_infinite_while_the_signal_is_below_the_noise():
    estimator = NoiseScale()
    assert estimator.value is None
    estimator.update(small_sq=2.0, big_sq=0.1, small_batch=4, big_batch=32)  # |G|^2 estimate < 0
    assert estimator.value == float("inf")
    with pytest.raises(ValueError, match="small_batch < big_batch"):
        estimator.update(1.0, 0.5, 8, 8)


def test_probe_pairs_the_first_batch_of_a_window_with_the_whole_window():
    # The trainer's .grad holds the sum of per-image gradients since the last optimizer step; the probe
    # reads it after the first batch and before the step. Same noisy quadratic as above: B_simple = 29.
    from types import SimpleNamespace

    import torch

    from detector.train.noise_scale import GradientNoiseProbe

    rng = np.random.default_rng(1)
    dims, sigma, batch, accumulate = 50, 0.7, 4, 8
    theta = rng.standard_normal(dims) / np.sqrt(dims)
    truth = dims * sigma**2 / np.sum(theta**2)
    model = torch.nn.Linear(dims, 1, bias=False)
    ctx = SimpleNamespace(model=model, scaler=torch.amp.GradScaler("cpu", enabled=False),
                          state=SimpleNamespace(iteration=0))
    probe = GradientNoiseProbe(decay=0.995)
    images = torch.zeros(batch, 3, 1, 1)  # only the count matters to the probe
    for _ in range(1500):
        model.weight.grad = torch.zeros(1, dims)
        for index in range(accumulate):
            x = sigma * rng.standard_normal((batch, dims))
            model.weight.grad += torch.tensor((theta - x).sum(0), dtype=torch.float32)[None]
            probe.observe(ctx, images, torch.zeros(0, 6), first=index == 0, last=index == accumulate - 1)
    assert probe.estimate.updates == 1500
    assert probe.estimate.value == pytest.approx(truth, rel=0.2), (probe.estimate.value, truth)
    assert probe.seconds == []  # no extra passes with accumulation
