"""Config + device + data + model -> Plan: the values a run derives (batch, accumulation, lr, ...).

The batch is either fixed (batch=N) or chosen by AutoBatch (batch=-1 or a fraction) from real training
steps on the training device; everything else follows from it. The plan is logged, saved in every
checkpoint and never written back into the config.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from detector import distributed
from detector.atomic import atomic_write_text
from detector.autobatch.choose import VERIFY_STEPS, AutoBatchError, Decision, choose_batch
from detector.autobatch.memory import MemoryProbe, probe_for
from detector.autobatch.records import gib
from detector.config import Config
from detector.data.batches import scale_sides
from detector.device import amp_dtype_for, device_ops
from detector.inference.predict import make_inference_step
from detector.train.probe import make_probe_step

logger = logging.getLogger(__name__)

AUTO_ADAMW_LR = 0.002  # optimizer=auto: AdamW at this lr (measured on the reference shapes set)


@dataclass(frozen=True)
class Plan:
    """Values derived from the config for this run; logged and saved, never written back into it."""

    device: str
    threads: int
    image_size: int  # imgsz rounded up to the stride: what every stage (cache, loader, validation) works at
    max_image_size: int  # the largest side of a training batch: image_size, or with multi_scale the largest drawn
    batch: int  # the global batch: images per training step over all ranks
    rank_batch: int  # images per step on each rank (batch / world_size): the loader's batch size
    accumulate: int  # batches per optimizer step
    batches_per_epoch: int
    weight_decay: float
    optimizer: str
    lr0: float
    warmup_iters: int
    amp_dtype: str  # autocast dtype as logged: "bfloat16", "float16", or "none" (full precision)
    batch_source: str = "fixed"  # "fixed", or what decided AutoBatch's choice (memory, throughput, ...)
    val_batch: int = 0  # images per validation step (0 = the training batch)
    world_size: int = 1  # DDP ranks sharing each batch (batch is the global batch)



def make_plan(config: Config, device: torch.device, threads: int, *, image_size: int, train_size: int, batch: int,
              batch_source: str = "fixed", val_batch: int = 0, world_size: int = 1) -> Plan:
    """Derive accumulation, weight decay, optimizer, lr and warm-up for a run that trains at `batch`.

    How the recipe follows the batch is config.lr_policy:
        nbs     accumulate round(nbs / batch) batches per optimizer step (at most an epoch's), lr
                unchanged: every batch up to nbs takes the same optimizer steps (the default)
        linear  one step per batch, lr0 * batch / nbs (Goyal et al. 2017; with the warm-up)
        sqrt    one step per batch, lr0 * sqrt(batch / nbs) (the usual rule for Adam-style optimizers)
        none    one step per batch, lr0 unchanged
    Weight decay follows the images per optimizer step in every case: weight_decay * batch * accumulate / nbs.

    A fixed batch validates at the same batch (a forward pass without gradients needs less memory than
    the training step that fitted); AutoBatch sizes validation from its own samples (`val_batch`).
    Under DDP `batch` is the global batch (world_size ranks, batch / world_size images each): the policy
    follows it, as it follows a single process's batch.
    """
    optimizer, lr0 = config.optimizer, config.lr0
    if optimizer == "auto":
        optimizer, lr0 = "AdamW", AUTO_ADAMW_LR
    rank_batch = distributed.rank_batch(batch, world_size)  # a ConfigError when the ranks cannot share it
    batches_per_epoch = math.ceil(train_size / batch)
    # At least one optimizer step per epoch: 4 coco8 images at batch 4 would otherwise wait 4 epochs.
    accumulate = max(min(round(config.nbs / batch), batches_per_epoch), 1) if config.lr_policy == "nbs" else 1
    lr0 *= {"nbs": 1.0, "none": 1.0, "linear": batch / config.nbs,
            "sqrt": math.sqrt(batch / config.nbs)}[config.lr_policy]
    weight_decay = config.weight_decay * batch * accumulate / config.nbs
    warmup_iters = round(config.warmup_epochs * batches_per_epoch)
    amp_dtype = amp_dtype_for(config.amp, device)
    if val_batch:
        val_batch = min(val_batch, host_val_cap(image_size, config.workers))
    return Plan(device=str(device), threads=threads, image_size=image_size,
                max_image_size=largest_train_side(image_size, config), batch=batch, rank_batch=rank_batch,
                accumulate=accumulate, batches_per_epoch=batches_per_epoch, weight_decay=weight_decay,
                optimizer=optimizer, lr0=lr0,
                warmup_iters=warmup_iters, amp_dtype=str(amp_dtype).removeprefix("torch.") if amp_dtype else "none",
                batch_source=batch_source, val_batch=val_batch or rank_batch, world_size=world_size)


HOST_SHARE = 0.1  # of the available host RAM that validation batches waiting in loader queues may hold


def host_val_cap(image_size: int, workers: int) -> int:
    """The largest validation batch whose queued copies fit HOST_SHARE of the available host RAM: each worker
    prefetches 2 batches of uint8 images, and the pinned copy and the one on its way add 2 more. AutoBatch
    sizes validation by device memory alone, which on a large GPU can be thousands of images."""
    queued = 2 * (workers if workers >= 0 else 8) + 2
    per_image = 3 * image_size * image_size
    return max(int(HOST_SHARE * psutil.virtual_memory().available / (queued * per_image)), 1)


def largest_train_side(image_size: int, config: Config) -> int:
    """The largest side a training batch can have: what AutoBatch must fit (multi_scale draws sides up to it)."""
    return max(scale_sides(image_size, config.multi_scale))


BATCHNORM_FLOOR = 8  # images per device below which BatchNorm's batch statistics get noisy (unless SyncBN)


def autobatch_key(config: Config, model: nn.Module, *, image_size: int, device_name: str, capacity: int,
                  max_boxes: int, world_size: int, amp_dtype: torch.dtype | None) -> dict:
    """What an AutoBatch decision depends on; a saved decision is reused only when all of it matches."""
    return {"model": dict(model.model_args), "imgsz": image_size,
            "train_imgsz": largest_train_side(image_size, config), "amp_dtype": str(amp_dtype),
            "channels_last": config.channels_last, "optimizer": config.optimizer, "ema": config.ema,
            "deterministic": config.deterministic, "lr_policy": config.lr_policy, "nbs": config.nbs,
            "fraction": config.auto_batch_fraction, "max_boxes": max_boxes, "device": device_name,
            "capacity_gib": round(capacity / 2**30), "world_size": world_size,
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""), "torch": torch.__version__}


def auto_batch(config: Config, model: nn.Module, criterion: nn.Module, *, device: torch.device, image_size: int,
               num_classes: int, max_boxes: int, train_size: int, val_size: int, run_dir: Path, save: bool = True,
               world_size: int = 1) -> tuple[Decision, Decision]:
    """AutoBatch's training and validation batches for this run, measured now or reused from
    run_dir/autobatch.json.

    The training probe is the training step at the worst case training meets: the largest training batch side
    (with multi_scale, image_size x (1 + multi_scale) rounded down to the stride), the most boxes any training
    sample can hold (`max_boxes`: with mosaic four images' worth, with mixup twice that), and the
    training AMP, memory format, optimizer, EMA and clipping. The validation probe is a forward pass without
    gradients, decoding and NMS at its worst case. On CPU images/s takes part in both choices (memory rarely
    limits there), and the training batch stays between the BatchNorm floor (8 images per rank) and, under
    lr_policy=nbs, nbs: above nbs each epoch would take fewer optimizer steps. `save`: write the decisions to
    run_dir/autobatch.json (rank 0 of a DDP run only).

    Raises:
        AutoBatchError: not even the first sampled batch fits.
    """
    probe = probe_for(device)
    probe.reset()
    amp_dtype, throughput = amp_dtype_for(config.amp, device), device_ops(device).kind == "cpu"
    key = autobatch_key(config, model, image_size=image_size, device_name=probe.name, capacity=probe.capacity(),
                        max_boxes=max_boxes, world_size=world_size, amp_dtype=amp_dtype)
    saved = _load_decisions(run_dir / "autobatch.json", key)
    if saved is not None:
        logger.info("AutoBatch: reusing batch %d (validation %d) from %s: same model, size, device and memory",
                    saved[0].batch, saved[1].batch, run_dir / "autobatch.json")
        return saved
    train_max = min(train_size, config.nbs) if throughput and config.lr_policy == "nbs" else train_size
    limits = {"train": (train_max, min(BATCHNORM_FLOOR, max(train_max // 2, 1)) if throughput else 1),
              "val": (val_size, 1)}  # (max batch, first sample): two samples fit under the cap
    decisions = []
    for phase, label in (("train", "training"), ("val", "validation")):
        size = key["train_imgsz"] if phase == "train" else image_size  # validation runs at image_size alone
        step = _probe_step(phase, config, model, criterion, probe, device=device, image_size=size,
                           num_classes=num_classes, max_boxes=max_boxes, amp_dtype=amp_dtype)
        max_batch, start = limits[phase]
        # On CPU the tracker's peak is the same every step: one verification step says it all.
        decisions.append(choose_batch(step, probe, fraction=config.auto_batch_fraction, max_batch=max_batch,
                                      start=start, measure_throughput=throughput, image_size=size,
                                      verify_steps=1 if throughput else VERIFY_STEPS, label=label))
        del step  # frees the probe's model copies, optimizer state and EMA before the next one
        probe.cleanup()
    if save:
        atomic_write_text(run_dir / "autobatch.json", json.dumps(
            {"key": key, "train": decisions[0].to_dict(), "val": decisions[1].to_dict()}, indent=1))
    return decisions[0], decisions[1]


def watch_first_epoch(device: torch.device) -> bool:
    """Start watching the peak of training's first epoch at AutoBatch's choice (CUDA: the allocator's peak; on a
    CPU there is no peak comparable with the tracker's, so nothing is watched)."""
    ops = device_ops(device)
    if ops.kind != "cuda":
        return False
    ops.synchronize()
    ops.reset_peak()
    return True


def record_first_epoch(decisions: tuple[Decision, Decision], device: torch.device, path: Path, save: bool) -> None:
    """Log the peak the first epoch reached next to the verified one, and keep it in autobatch.json."""
    ops = device_ops(device)
    ops.synchronize()
    train, val = decisions
    logger.info(train.record_first_epoch(ops.peak_reserved()))
    if save and path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        atomic_write_text(path, json.dumps({**saved, "train": train.to_dict(), "val": val.to_dict()}, indent=1))


def _probe_step(phase: str, config: Config, model: nn.Module, criterion: nn.Module, probe: MemoryProbe, *,
                device: torch.device, image_size: int, num_classes: int, max_boxes: int,
                amp_dtype: torch.dtype | None) -> Callable[[int], None]:
    """The step AutoBatch measures for `phase`: training's (train/probe.py) or validation's forward pass.

    Raises:
        AutoBatchError: the probe's own copies of the model (weights, EMA, optimizer state) do not fit.
    """
    try:
        if phase == "train":
            return make_probe_step(model, criterion, image_size=image_size, max_boxes=max(max_boxes, 1),
                                   num_classes=num_classes, device=device, amp_dtype=amp_dtype,
                                   channels_last=config.channels_last,
                                   optimizer_name="SGD" if config.optimizer == "SGD" else "AdamW", ema=config.ema,
                                   grad_clip=config.grad_clip, seed=config.seed)
        return make_inference_step(model, image_size=image_size, device=device, amp_dtype=amp_dtype,
                                   channels_last=config.channels_last, iou=config.iou, max_det=config.max_det,
                                   seed=config.seed)
    except Exception as err:
        if not probe.is_oom(err):
            raise
        raise AutoBatchError(f"AutoBatch's copies of the model (weights, EMA, optimizer state) do not fit "
                             f"{probe.name} at imgsz {image_size}: this process has {gib(probe.capacity())} GiB; "
                             "use a smaller model or imgsz") from err


def _load_decisions(path: Path, key: dict[str, Any]) -> tuple[Decision, Decision] | None:
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if saved.get("key") != json.loads(json.dumps(key)):
        return None
    return Decision.from_dict(saved["train"]), Decision.from_dict(saved["val"])
