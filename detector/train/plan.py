"""Config + device + data + model -> Plan: the values a run derives (batch, accumulation, lr, ...).

The batch is either fixed (batch=N) or chosen by AutoBatch (batch=-1 or a fraction) from real training
steps on the training device; everything else follows from it. The plan is logged, saved in every
checkpoint and never written back into the config.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detector.atomic import atomic_write_text
from detector.autobatch.choose import Decision, choose_batch
from detector.autobatch.memory import probe_for
from detector.config import Config
from detector.data.augment import round_image_size
from detector.device import amp_dtype_for
from detector.inference.predict import make_inference_step
from detector.train.probe import make_probe_step

logger = logging.getLogger(__name__)

AUTO_ADAMW_LR = 0.002  # optimizer=auto: AdamW at this lr (measured on the reference shapes set)


@dataclass(frozen=True)
class Plan:
    """Values derived from the config for this run; logged and saved, never written back into it."""

    device: str
    threads: int
    image_size: int
    batch: int
    accumulate: int
    weight_decay: float
    optimizer: str
    lr0: float
    warmup_iters: int
    amp_dtype: str  # autocast dtype as logged: "bfloat16", "float16", or "none" (full precision)
    batch_source: str = "fixed"  # "fixed", or what decided AutoBatch's choice (memory, throughput, ...)
    val_batch: int = 0  # images per validation step (0 = the training batch)
    world_size: int = 1  # DDP ranks sharing each batch (batch is the global batch)



def make_plan(config: Config, device: torch.device, threads: int, train_size: int, batch: int,
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
    batches_per_epoch = math.ceil(train_size / batch)
    # At least one optimizer step per epoch: 4 coco8 images at batch 4 would otherwise wait 4 epochs.
    accumulate = max(min(round(config.nbs / batch), batches_per_epoch), 1) if config.lr_policy == "nbs" else 1
    lr0 *= {"nbs": 1.0, "none": 1.0, "linear": batch / config.nbs,
            "sqrt": math.sqrt(batch / config.nbs)}[config.lr_policy]
    weight_decay = config.weight_decay * batch * accumulate / config.nbs
    warmup_iters = round(config.warmup_epochs * batches_per_epoch)
    amp_dtype = amp_dtype_for(config.amp, device)
    return Plan(device=str(device), threads=threads, image_size=round_image_size(config.imgsz), batch=batch,
                accumulate=accumulate, weight_decay=weight_decay, optimizer=optimizer, lr0=lr0,
                warmup_iters=warmup_iters, amp_dtype=str(amp_dtype).removeprefix("torch.") if amp_dtype else "none",
                batch_source=batch_source, val_batch=val_batch or batch // world_size, world_size=world_size)


def autobatch_key(config: Config, model: nn.Module, device_name: str, capacity: int, max_boxes: int) -> dict:
    """What an AutoBatch decision depends on; a saved decision is reused only when all of it matches."""
    return {"model": dict(model.model_args), "imgsz": round_image_size(config.imgsz), "amp": config.amp,
            "channels_last": config.channels_last, "optimizer": config.optimizer,
            "fraction": config.auto_batch_fraction, "max_boxes": max_boxes, "device": device_name,
            "capacity_gib": round(capacity / 2**30), "torch": torch.__version__}


def auto_batch(config: Config, model: nn.Module, criterion: nn.Module, *, device: torch.device, num_classes: int,
               max_boxes: int, train_size: int, val_size: int, run_dir: Path,
               save: bool = True) -> tuple[Decision, Decision]:
    """AutoBatch's training and validation batches for this run, measured now or reused from
    run_dir/autobatch.json.

    The training probe is the training step at the worst case training meets: the training image size,
    the most boxes of any training image, and the training AMP, memory format, optimizer, EMA and
    clipping. The validation probe is a forward pass without gradients, decoding and NMS at its worst
    case. On CPU images/s takes part in both choices (memory rarely limits there). `save`: write the
    decisions to run_dir/autobatch.json (rank 0 of a DDP run only).

    Raises:
        AutoBatchError: not even the first sampled batch fits.
    """
    probe = probe_for(device)
    probe.reset()
    key = autobatch_key(config, model, probe.name, probe.capacity(), max_boxes)
    saved = _load_decisions(run_dir / "autobatch.json", key)
    if saved is not None:
        logger.info("AutoBatch: reusing batch %d (validation %d) from %s: same model, size, device and memory",
                    saved[0].batch, saved[1].batch, run_dir / "autobatch.json")
        return saved
    image_size, amp_dtype = round_image_size(config.imgsz), amp_dtype_for(config.amp, device)
    channels_last = config.channels_last
    decisions = []
    for phase in ("train", "val"):
        if phase == "train":
            step = make_probe_step(model, criterion, image_size=image_size, max_boxes=max(max_boxes, 1),
                                   num_classes=num_classes, device=device, amp_dtype=amp_dtype,
                                   channels_last=channels_last,
                                   optimizer_name="SGD" if config.optimizer == "SGD" else "AdamW", ema=config.ema,
                                   grad_clip=config.grad_clip, seed=config.seed)
        else:
            step = make_inference_step(model, image_size=image_size, device=device, amp_dtype=amp_dtype,
                                       channels_last=channels_last, iou=config.iou, max_det=config.max_det,
                                       seed=config.seed)
        decisions.append(choose_batch(step, probe, fraction=config.auto_batch_fraction,
                                      max_batch=train_size if phase == "train" else val_size,
                                      measure_throughput=device.type == "cpu",
                                      label="training" if phase == "train" else "validation"))
        del step  # frees the probe's model copies, optimizer state and EMA before the next one
        probe.cleanup()
    if save:
        atomic_write_text(run_dir / "autobatch.json", json.dumps(
            {"key": key, "train": decisions[0].to_dict(), "val": decisions[1].to_dict()}, indent=1))
    return decisions[0], decisions[1]


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
