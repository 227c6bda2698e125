"""Samples -> Batch, and the DataLoader that makes them.

Each sample draws its randomness from a generator seeded by (seed, epoch, index), so the batches of
an epoch are the same whatever the number of workers or the order they run in; data/batches.py orders an
epoch's images into batches and gives each its side (multi_scale).
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from dataclasses import dataclass, fields

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from detector.data.augment import TrainTransform, letterbox, rect_shape
from detector.data.batches import TrainBatchSampler, scale_sides
from detector.data.coco import CocoDataset, Target
from detector.device import cpu_share

logger = logging.getLogger(__name__)

AUGMENT_KEYS = ("mosaic", "mixup", "degrees", "translate", "scale", "shear", "fliplr", "flipud", "hsv_h", "hsv_s",
                "hsv_v")


@dataclass
class Batch:
    """A collated batch.

    Attributes:
        images: uint8 (B, 3, H, W) RGB, channels_last in memory (device.prepare_images sets the format); training
            batches are S x S (S the batch's side: imgsz, or with multi_scale one drawn per batch), validation
            batches the rectangle of their images (see DetectionDataset.batch_by_shape).
        targets: float32 (N, 6) rows [batch_index, class, x1, y1, x2, y2] in input pixels.
        image_ids: int64 (B,) COCO image ids.
        scales: float32 (B,) letterbox scale (input = original * scale + pad); 1 for training samples.
        pads: float32 (B, 2) letterbox (pad_x, pad_y); 0 for training samples.
        orig_sizes: int64 (B, 2) original (height, width).
    """

    images: torch.Tensor
    targets: torch.Tensor
    image_ids: torch.Tensor
    scales: torch.Tensor
    pads: torch.Tensor
    orig_sizes: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on `device`."""
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                        for f in fields(self)})

    def pin_memory(self) -> Batch:
        """Lets DataLoader(pin_memory=True) pin a Batch."""
        return Batch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class Sample:
    """One transformed image: image uint8 (S, S, 3) RGB, Target in its pixels, letterbox and origin."""

    image: np.ndarray
    target: Target
    image_id: int
    scale: float
    pad: tuple[float, float]
    orig_size: tuple[int, int]


class DetectionDataset(Dataset):
    """A CocoDataset with the training augmentation or the validation letterbox applied."""

    def __init__(self, dataset: CocoDataset, *, train: bool, image_size: int, seed: int = 0,
                 augment: dict | None = None, mosaic: bool = True, fraction: float = 1.0) -> None:
        """Args:
            dataset: The images and boxes.
            train: Augment (True) or only letterbox (False).
            image_size: Output side S in pixels.
            seed: Seed of the augmentation randomness.
            augment: TrainTransform keyword arguments (keys of AUGMENT_KEYS); others are ignored.
            mosaic: False switches mosaic and mixup off whatever augment says (the last close_mosaic epochs).
            fraction: Use this leading fraction of a seeded permutation of the images (0 < f <= 1).
        """
        self.dataset = dataset
        self.train = train
        self.image_size = image_size
        self.seed = seed
        options = {k: v for k, v in (augment or {}).items() if k in AUGMENT_KEYS}
        if not mosaic:
            options["mosaic"] = options["mixup"] = 0.0
        self.transform = TrainTransform(image_size, **options) if train else None
        count = len(dataset)
        if fraction < 1.0:
            order = np.random.default_rng([seed, 7]).permutation(count)
            self.indices = sorted(order[:max(math.ceil(count * fraction), 1)].tolist())
        else:
            self.indices = list(range(count))
        self.shapes: list[tuple[int, int]] | None = None  # validation input (height, width) per position
        # Shared memory: persistent workers see set_epoch() of the main process.
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def batch_by_shape(self, batch_size: int) -> list[list[int]]:
        """Letterboxes each image to its own rectangle (the smallest multiples of 32 that hold it with its longest
        side at S) and returns batches of positions: up to `batch_size` images of one rectangle, full batches
        first. Validation spends no compute on padding, and an image's input, so its detections, depend on
        neither the batch size nor its batch-mates (a batch padded to its largest rectangle would make the mAP
        move with the validation batch).
        """
        sizes = [self.dataset.orig_size(i) for i in self.indices]
        order = sorted(range(len(sizes)), key=lambda i: sizes[i][0] / sizes[i][1])
        self.indices = [self.indices[i] for i in order]
        self.shapes = [rect_shape(*sizes[i], self.image_size) for i in order]
        # Ordered by aspect ratio, the images of one rectangle are next to each other.
        runs = [list(run) for _, run in itertools.groupby(range(len(order)), key=self.shapes.__getitem__)]
        batches = [run[start:start + batch_size] for run in runs for start in range(0, len(run), batch_size)]
        return sorted(batches, key=len, reverse=True)  # the first batch (plotted, and the largest) is full

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch that seeds the augmentation (call before iterating)."""
        self._epoch[0] = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int | tuple[int, int]) -> Sample:
        """The sample at `item`: a position, or (position, side) from a TrainBatchSampler (training at that side)."""
        position, side = item if isinstance(item, tuple) else (item, self.image_size)
        index = self.indices[position]
        if self.transform is not None:
            rng = np.random.default_rng([self.seed, int(self._epoch[0]), index])
            image, target = self.transform(self.dataset, index, rng, size=side)
            return Sample(image, target, self.dataset.image_ids[index], 1.0, (0.0, 0.0),
                          self.dataset.orig_size(index))
        image, target, image_id = self.dataset.load(index, self.image_size)
        orig_height, orig_width = self.dataset.orig_size(index)
        # A cached or reduced-scale decode may be smaller than the file: the batch maps from the file's pixels.
        cache_ratio = max(image.shape[:2]) / max(orig_height, orig_width)
        shape = self.shapes[position] if self.shapes is not None else self.image_size
        image, boxes, scale, pad = letterbox(image, target.boxes_xyxy, shape)
        return Sample(image, Target(boxes, target.classes), image_id, scale * cache_ratio, pad,
                      (orig_height, orig_width))


def collate(samples: list[Sample]) -> Batch:
    """Stacks samples into a Batch (see Batch for shapes); targets of all images in one (N, 6) tensor."""
    # (B, S, S, 3) memory seen as (B, 3, S, S): channels_last strides, which is what training wants. In a
    # worker, default_collate stacks straight into shared memory, sparing the copy the pickler would make of
    # a stacked batch: CPU that the training step on the same cores would lose (docs/performance.md).
    images = default_collate([torch.from_numpy(s.image) for s in samples]).permute(0, 3, 1, 2)
    rows = [np.concatenate([np.full((len(s.target), 1), i, np.float32),
                            s.target.classes.reshape(-1, 1).astype(np.float32),
                            s.target.boxes_xyxy.reshape(-1, 4).astype(np.float32)], axis=1)
            for i, s in enumerate(samples)]
    return Batch(
        images=images,
        targets=torch.from_numpy(np.concatenate(rows) if rows else np.zeros((0, 6), np.float32)),
        image_ids=torch.tensor([s.image_id for s in samples], dtype=torch.int64),
        scales=torch.tensor([s.scale for s in samples], dtype=torch.float32),
        pads=torch.tensor([s.pad for s in samples], dtype=torch.float32).reshape(-1, 2),
        orig_sizes=torch.tensor([s.orig_size for s in samples], dtype=torch.int64).reshape(-1, 2),
    )


def _seed_worker(worker_id: int) -> None:
    """Seeds the libraries a transform might use from torch's per-worker seed (base seed + worker id)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


@dataclass(frozen=True)
class TrainSampling:
    """What a training loader draws besides its batch size: augmentation, the share of the images, this rank's part.

    Attributes:
        augment: TrainTransform keyword arguments (hsv_h, ..., mosaic); None for its defaults.
        mosaic: False turns mosaic and mixup off (the last close_mosaic epochs).
        multi_scale: Each batch at a side drawn from image_size x [1 - f, 1 + f] (data/batches.py); 0 = off.
        fraction: Train on this fraction of the images (seeded choice).
        rank, world_size: Under DDP, this rank loads every world_size-th image of the epoch's order from
            position `rank` on (batch_size is then the per-rank batch).
        drop_last: Drop a last incomplete batch.
    """

    augment: dict | None = None
    mosaic: bool = True
    multi_scale: float = 0.0
    fraction: float = 1.0
    rank: int = 0
    world_size: int = 1
    drop_last: bool = False


def build_dataloader(dataset: CocoDataset, *, train: bool, image_size: int, batch_size: int, workers: int,
                     seed: int = 0, device: torch.device | str = "cpu",
                     sampling: TrainSampling | None = None) -> DataLoader:
    """A DataLoader of Batch objects.

    Args:
        dataset: The images and boxes.
        train: Shuffle and augment; else letterbox, in batches of images of one rectangle (batch_by_shape).
        image_size: Side S of the square inputs (a multiple of 32).
        batch_size: Images per batch.
        workers: Worker processes (0: load in the calling process; -1: the CPU cores of this rank that the
            device's work leaves free, at most 8: all but one on CUDA, those torch's threads leave on the CPU).
        seed: Seed of the shuffle order and the augmentation.
        device: Where the batches are used: CUDA pins them (faster host-to-GPU copies); it also sets -1 workers,
            and on the CPU OpenCV runs on one thread.
        sampling: How training samples (None: TrainSampling's defaults); validation ignores it.

    Returns:
        The DataLoader; call `set_epoch(loader, epoch)` before each epoch. A training loader's batch sampler
        is a TrainBatchSampler (a resumed epoch can skip the batches already done).
    """
    sampling = sampling or TrainSampling()
    wrapped = DetectionDataset(dataset, train=train, image_size=image_size, seed=seed, augment=sampling.augment,
                               mosaic=sampling.mosaic, fraction=sampling.fraction if train else 1.0)
    if train:
        # The order of an epoch depends on (seed, epoch) alone, so a resumed run sees the same batches
        # as an uninterrupted one, and the ranks of a DDP run split one order between them: together
        # their k-th batches hold the images of a single process's k-th batch of world_size times the size.
        sampler = DistributedSampler(wrapped, num_replicas=sampling.world_size, rank=sampling.rank, shuffle=True,
                                     seed=seed)
        batching = {"batch_sampler": TrainBatchSampler(sampler, batch_size=batch_size, drop_last=sampling.drop_last,
                                                       sides=scale_sides(image_size, sampling.multi_scale), seed=seed)}
    else:
        batching = {"batch_sampler": wrapped.batch_by_shape(batch_size)}
    device = torch.device(device)
    workers = _loader_workers(workers, device, log=train)
    if workers or device.type == "cpu":
        # OpenCV's own thread pool competes with torch's threads for the cores. Process-wide; workers inherit it
        # at fork (it cannot be set safely inside one).
        cv2.setNumThreads(1)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(wrapped, **batching, num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda",
                      generator=generator, worker_init_fn=_seed_worker, persistent_workers=workers > 0)


def _loader_workers(workers: int, device: torch.device, log: bool) -> int:
    """`workers`, or for -1 the cores this rank's device work leaves free, at most 8 (said in the log when `log`)."""
    if workers >= 0:
        return workers
    # On the CPU torch's threads (one per physical core) already use the cores, and a worker on one stalls
    # them at every join: only the cores they leave (SMT siblings) load (docs/performance.md).
    cores, busy = cpu_share(), torch.get_num_threads() if device.type == "cpu" else 1
    workers = min(max(cores - busy, 0), 8)
    if log:
        logger.info("workers=-1: %d loader processes (%d CPU cores, %d busy with %s)", workers, cores, busy,
                    "torch's threads" if device.type == "cpu" else "the main process")
    return workers


def set_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> None:
    """Select the epoch that seeds a loader's shuffle order and augmentation (call before iterating it).

    skip_batches: Leave out the epoch's first batches (those a stopped run trained on before it was
        stopped); training loaders only.
    """
    loader.dataset.set_epoch(epoch)
    if isinstance(loader.batch_sampler, TrainBatchSampler):
        loader.batch_sampler.set_epoch(epoch, skip_batches)
    elif skip_batches:
        raise ValueError("only a training loader (a TrainBatchSampler) can skip batches")
    elif hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
