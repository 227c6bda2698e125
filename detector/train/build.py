"""Config -> the stages of a training run, one build function each, in data-flow order.

resolve_config (defaults < data card < checkpoint < overrides) -> build_datasets -> build_detector
-> build_criterion -> (the plan: train/plan.py) -> build_step_context. trainer.py calls them in that order.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from detector import distributed
from detector.config import Config, check_keys, check_values, class_indices, load_defaults, make_config
from detector.data.cards import DataCard, load_data_card
from detector.data.coco import CocoDataset
from detector.device import amp_dtype_for, select_device, set_threads
from detector.model.loss import DetectionLoss
from detector.model.network import Detector, build_model
from detector.train.checkpoint import load_checkpoint
from detector.train.engine import StepContext
from detector.train.optim import ModelEMA, Schedule, build_optimizer
from detector.train.plan import Plan
from detector.train.resume import resume_checkpoint
from detector.train.tensorboard import summary_writer_class

logger = logging.getLogger(__name__)


def resolve_config(overrides: dict[str, Any]) -> tuple[Config, DataCard, dict | None, dict | None]:
    """Merge defaults < data card < checkpoint args (resume) < user overrides.

    Returns the config, the data card, on resume the checkpoint to continue from, and otherwise the model=<.pt>
    checkpoint to start from (each read once).
    """
    values = check_values(overrides)
    select_device(values.get("device", ""))  # fail on a bad value before any data is touched
    if values.get("tensorboard"):
        summary_writer_class()  # without the package: one error naming the pip command
    checkpoint, ckpt_args, overrides = resume_checkpoint(overrides)
    model = str(overrides.get("model", ""))
    # An unusable file fails here, before the data card fetches, converts or scans anything.
    start = load_checkpoint(model) if checkpoint is None and model.endswith(".pt") else None
    data_spec = overrides.get("data", ckpt_args.get("data", load_defaults()["data"]))
    card = load_data_card(str(data_spec))
    check_keys(card.settings, source=f"key in data card {data_spec}:")  # a card's other keys are settings
    config = make_config(card.settings, ckpt_args, overrides)
    if config.tensorboard:
        summary_writer_class()  # asked by the data card or the resumed run
    if checkpoint is None and start is None and config.model.endswith(".pt"):
        start = load_checkpoint(config.model)  # named by the data card
    return config, card, checkpoint, start


def set_up_process(config: Config) -> int:
    """This process's threads, seed and (deterministic=true) algorithms; returns the number of threads."""
    threads = set_threads(config.threads)
    torch.manual_seed(config.seed)
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    return threads


def build_datasets(config: Config, card: DataCard, image_size: int
                   ) -> tuple[CocoDataset, CocoDataset, list[int] | None]:
    """(training set, validation set, the class indices classes= keeps or None for all).

    Only the training set is cached in RAM, at `image_size`, the size its samples are made at.
    """
    classes = class_indices(config.classes, card.names)
    labels = {"skip_bad_images": config.skip_bad_images, "single_cls": config.single_cls, "classes": classes}
    cache = config.cache if config.cache == "auto" else config.cache == "true"
    train_data = CocoDataset(card.train_images, card.train_json, image_size=image_size, cache=cache, **labels)
    val_data = CocoDataset(card.val_images, card.val_json, **labels)
    return train_data, val_data, classes


def build_detector(config: Config, num_classes: int, checkpoint: dict | None, start: dict | None) -> Detector:
    """The resumed run's model (`checkpoint`), one initialised from the model=<.pt> `start`, or a fresh one."""
    if checkpoint is not None:  # its own shape and weights, whether or not the file it started from is still there
        model = Detector(**checkpoint["model_args"])
        model.load_state_dict(checkpoint["raw_model"])
    elif start is not None:
        model = Detector(**{**start["model_args"], "num_classes": num_classes})
        state = {k: v for k, v in start["model"].items() if k in model.state_dict()
                 and v.shape == model.state_dict()[k].shape}
        model.load_state_dict(state, strict=False)
        logger.info("initialised %d/%d tensors from %s", len(state), len(model.state_dict()), config.model)
        if start["model_args"]["num_classes"] != num_classes:
            logger.info("class outputs start fresh: %s has %d classes, the data %d", config.model,
                        start["model_args"]["num_classes"], num_classes)
    else:
        model = build_model(config.model, num_classes)
    if config.freeze:
        frozen = model.freeze(config.freeze)
        logger.info("freeze=%d: %d of %d parameters stay as they start", config.freeze, frozen,
                    sum(p.numel() for p in model.parameters()))
    # channels_last: NHWC weights as well as inputs, so oneDNN (CPU) and cuDNN skip a reorder per convolution.
    return model.to(memory_format=torch.channels_last) if config.channels_last else model


def build_criterion(config: Config, model: Detector, world_size: int) -> DetectionLoss:
    """The loss of `model`'s outputs; under DDP it averages the number of targets over the ranks."""
    return DetectionLoss(num_classes=model.num_classes, strides=model.strides, reg_max=model.reg_max,
                         box_gain=config.box, cls_gain=config.cls, dfl_gain=config.dfl, world_size=world_size,
                         all_reduce=torch.distributed.all_reduce if world_size > 1 else None)


def build_step_context(config: Config, plan: Plan, model: nn.Module, criterion: nn.Module, device: torch.device,
                       world_size: int) -> tuple[nn.Module, StepContext]:
    """The model (its batch norms synchronised when asked under DDP) and the StepContext train_step runs with:
    the model as the step calls it (DDP-wrapped under torchrun), optimizer, schedule, AMP scaler and EMA."""
    model, ranked_model = distributed.wrap_model(model, device, world_size, plan.rank_batch, config.sync_bn)
    optimizer = build_optimizer(model, name=plan.optimizer, lr=plan.lr0, momentum=config.momentum,
                                weight_decay=plan.weight_decay)
    schedule = Schedule(lr0=plan.lr0, lrf=config.lrf, epochs=config.epochs, iters_per_epoch=plan.batches_per_epoch,
                        warmup_iters=plan.warmup_iters, warmup_bias_lr=config.warmup_bias_lr,
                        warmup_momentum=config.warmup_momentum, momentum=config.momentum,
                        accumulate=plan.accumulate, cosine=config.cos_lr)
    amp_dtype = amp_dtype_for(config.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return model, StepContext(model=ranked_model, criterion=criterion, optimizer=optimizer, schedule=schedule,
                              scaler=scaler, ema=ModelEMA(model) if config.ema else None, device=device,
                              amp_dtype=amp_dtype, channels_last=config.channels_last, grad_clip=config.grad_clip)


def worst_case_boxes(dataset: CocoDataset, mosaic: float, mixup: float) -> int:
    """The most boxes one training sample can hold: a mosaic joins four images, so the four densest; mixup blends
    two samples, so twice that (the eight densest with mosaic)."""
    counts = sorted(len(t) for t in dataset.targets)
    images = (4 if mosaic > 0 else 1) * (2 if mixup > 0 else 1)
    return sum(counts[-images:]) if counts else 0
