"""The gradient noise scale estimator on a problem whose noise scale is known exactly."""

import numpy as np
import pytest

from detector.noise_scale import NoiseScale


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
