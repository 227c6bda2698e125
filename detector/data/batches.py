"""The batches of a training epoch: which images, in which order, and at which side (multi_scale).

The order depends on (seed, epoch) alone and the side of the k-th batch on (seed, epoch, k) alone, so a resumed
run meets the batches and sides an uninterrupted one met, and the ranks of a DDP run, each cutting its share of
one order into batches, train their k-th batches at the same side.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

STRIDE = 32  # the largest stride of the model: input sides are multiples of it
_SIDE_STREAM = 0x5CA1E  # keeps the sides' random stream apart from the samples' (seed, epoch, index) streams


def scale_sides(image_size: int, multi_scale: float) -> list[int]:
    """The sides multi_scale draws from: the multiples of 32 within image_size x [1 - f, 1 + f], at least 32.

    image_size (a multiple of 32) is always one of them; multi_scale=0 gives [image_size] alone.
    """
    low = max(math.ceil(round(image_size * (1 - multi_scale) / STRIDE, 6)), 1) * STRIDE
    high = max(math.floor(round(image_size * (1 + multi_scale) / STRIDE, 6)), 1) * STRIDE
    return list(range(low, high + 1, STRIDE))


def batch_side(sides: list[int], *, seed: int, epoch: int, batch_index: int) -> int:
    """The side of batch `batch_index` of `epoch`: one of `sides`, uniformly, from (seed, epoch, batch_index)."""
    if len(sides) == 1:
        return sides[0]
    return sides[int(np.random.default_rng([seed, epoch, batch_index, _SIDE_STREAM]).integers(len(sides)))]


class TrainBatchSampler(Sampler[list[tuple[int, int]]]):
    """A training epoch's batches: the order of `sampler` cut into batches of (position, side) items, every item of
    a batch with the batch's side.

    The wrapped sampler's order depends on (seed, epoch) alone (a DistributedSampler), so leaving out the first
    `skip` batches gives exactly the batches a stopped run had not trained on yet, at the same sides.
    """

    def __init__(self, sampler: Sampler[int], *, batch_size: int, drop_last: bool, sides: list[int],
                 seed: int) -> None:
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.sides, self.seed = sides, seed
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch (its order and sides) and the number of its first batches to leave out."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        self.epoch, self.skip = epoch, skip

    def side(self, batch_index: int) -> int:
        return batch_side(self.sides, seed=self.seed, epoch=self.epoch, batch_index=batch_index)

    def _batches(self) -> int:
        count = len(self.sampler)
        return count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = list(self.sampler)
        for k in range(self.skip, self._batches()):
            side = self.side(k)
            yield [(position, side) for position in order[k * self.batch_size:(k + 1) * self.batch_size]]

    def __len__(self) -> int:
        return max(self._batches() - self.skip, 0)
