"""Training orchestration: build each stage in data-flow order, then loop over epochs.

data card -> datasets -> model -> loss -> batch plan -> optimizer/schedule/EMA -> loaders -> epochs
(train_one_epoch, evaluate, results.csv, checkpoints, plots) -> final metrics.

Under torchrun every rank runs this with its share of each batch (see distributed.py); rank 0 alone
writes the run folder and validates.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from detector import distributed
from detector.atomic import atomic_write_text
from detector.config import Config, check_keys, class_indices, load_defaults, make_config
from detector.data.augment import round_image_size
from detector.data.cards import DataCard, load_data_card
from detector.data.coco import CocoDataset
from detector.data.loader import AUGMENT_KEYS, build_dataloader, set_epoch
from detector.device import amp_dtype_for, select_device, set_threads
from detector.evaluate.metrics import DetectionMetrics, coco_evaluate, load_ground_truth
from detector.evaluate.plots import plot_batch, plot_labels, plot_results
from detector.model.loss import DetectionLoss
from detector.model.network import Detector, build_model
from detector.runs import make_run_dir, setup_logging
from detector.train.checkpoint import (
    load_checkpoint,
    pending_gradients,
    restore_gradients,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from detector.train.engine import LoopState, StepContext, plot_validation, predict_loader, train_one_epoch
from detector.train.interrupt import StopRequest
from detector.train.optim import ModelEMA, Schedule, build_optimizer
from detector.train.plan import Plan, auto_batch, make_plan
from detector.train.resume import resume_checkpoint

logger = logging.getLogger(__name__)


def resolve_config(overrides: dict[str, Any]) -> tuple[Config, DataCard, dict | None, dict | None]:
    """Merge defaults < data card < checkpoint args (resume) < user overrides.

    Returns the config, the data card, on resume the checkpoint to continue from, and otherwise the model=<.pt>
    checkpoint to start from (each read once).
    """
    select_device(make_config(overrides).device)  # fail on a bad value before any data is touched
    checkpoint, ckpt_args, overrides = resume_checkpoint(overrides)
    model = str(overrides.get("model", ""))
    # An unusable file fails here, before the data card fetches, converts or scans anything.
    start = load_checkpoint(model) if checkpoint is None and model.endswith(".pt") else None
    data_spec = overrides.get("data", ckpt_args.get("data", load_defaults()["data"]))
    card = load_data_card(str(data_spec))
    check_keys(card.settings, source=f"key in data card {data_spec}:")  # a card's other keys are settings
    config = make_config(card.settings, ckpt_args, overrides)
    if checkpoint is None and start is None and config.model.endswith(".pt"):
        start = load_checkpoint(config.model)  # named by the data card
    return config, card, checkpoint, start


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
    else:
        model = build_model(config.model, num_classes)
    if config.freeze:
        frozen = model.freeze(config.freeze)
        logger.info("freeze=%d: %d of %d parameters stay as they start", config.freeze, frozen,
                    sum(p.numel() for p in model.parameters()))
    # channels_last: NHWC weights as well as inputs, so oneDNN (CPU) and cuDNN skip a reorder per convolution.
    return model.to(memory_format=torch.channels_last) if config.channels_last else model


class Trainer:
    """One training run: set up every stage from the config, then fit()."""

    def __init__(self, overrides: dict[str, Any], progress: bool = True):
        self.config, self.card, checkpoint, start = resolve_config(overrides)
        # Rounded once, so every stage (the RAM cache included) works at the size training uses, warned once.
        self.config = config = replace(self.config, imgsz=round_image_size(self.config.imgsz))
        self.device = distributed.setup(select_device(config.device))
        self.world, self.main = distributed.world_size(), distributed.is_main()
        self.progress = progress and self.main
        threads = set_threads(config.threads)
        torch.manual_seed(config.seed)
        if config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        # Data first: a broken dataset fails here, before a run folder exists.
        self.classes = class_indices(config.classes, self.card.names)
        labels = {"skip_bad_images": config.skip_bad_images, "single_cls": config.single_cls, "classes": self.classes}
        cache = config.cache if config.cache == "auto" else config.cache == "true"
        self.train_data = CocoDataset(self.card.train_images, self.card.train_json, image_size=config.imgsz,
                                      cache=cache, **labels)
        self.val_data = CocoDataset(self.card.val_images, self.card.val_json, **labels)
        self.names = self.train_data.names
        self.train_size = max(math.ceil(len(self.train_data) * config.fraction), 1)
        self.model = build_detector(config, len(self.names), checkpoint, start).to(self.device)
        self.criterion = DetectionLoss(num_classes=len(self.names), strides=self.model.strides,
                                       reg_max=self.model.reg_max, box_gain=config.box,
                                       cls_gain=config.cls, dfl_gain=config.dfl, world_size=self.world,
                                       all_reduce=torch.distributed.all_reduce if self.world > 1 else None)

        self.run_dir = Path(config.resume).parents[1] if checkpoint is not None else distributed.on_main(
            make_run_dir, config.project, config.name, config.exist_ok)
        self.weights_dir = self.run_dir / "weights"
        if self.main:
            self.weights_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(self.run_dir / "train.log" if self.main else None, verbose=self.main)
        self.plan = self._plan(threads, checkpoint)
        self.ctx = self._step_context()
        self.start_epoch, self.best_fitness, self.rows = 0, -1.0, []
        if checkpoint is not None:
            self._restore(checkpoint)
        self.ground_truth = load_ground_truth(self.val_data.annotation_json, config.single_cls, self.classes)
        if self.main:
            atomic_write_text(self.run_dir / "args.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        logger.info("run folder %s; %s", self.run_dir, ", ".join(f"{k}={v}" for k, v in asdict(self.plan).items()))

    def _plan(self, threads: int, checkpoint: dict | None) -> Plan:
        """The global batch (fixed, AutoBatch's, or the interrupted run's) and what follows from it.

        Under DDP each rank trains on batch / world_size images of every batch; AutoBatch's per-rank
        choice is the smallest of the ranks' own, so every device fits it.
        """
        config, world = self.config, self.world
        if checkpoint is not None:
            # A resumed run keeps its global batch (the schedule counts batches, and its accumulation rests
            # on it), whatever the number of ranks now.
            saved = checkpoint["plan"]
            distributed.rank_batch(saved["batch"], world)
            return make_plan(config, self.device, threads, self.train_size, saved["batch"], saved["batch_source"],
                             saved["val_batch"], world_size=world)
        if config.auto_batch_fraction is None:
            distributed.rank_batch(int(config.batch), world)
            return make_plan(config, self.device, threads, self.train_size, int(config.batch), world_size=world)
        train, val = auto_batch(config, self.model, self.criterion, device=self.device, num_classes=len(self.names),
                                max_boxes=self.train_data.max_boxes, train_size=math.ceil(self.train_size / world),
                                val_size=len(self.val_data), run_dir=self.run_dir, save=self.main)
        per_rank = distributed.agree_on_batch(train.batch)
        return make_plan(config, self.device, threads, self.train_size, per_rank * world, train.decided_by,
                         val.batch, world_size=world)

    def _step_context(self) -> StepContext:
        config, plan = self.config, self.plan
        self.model, ranked_model = distributed.wrap_model(self.model, self.device, self.world, plan.batch // self.world,
                                                     config.sync_bn)
        optimizer = build_optimizer(self.model, name=plan.optimizer, lr=plan.lr0, momentum=config.momentum,
                                    weight_decay=plan.weight_decay)
        iters_per_epoch = math.ceil(self.train_size / plan.batch)
        schedule = Schedule(lr0=plan.lr0, lrf=config.lrf, epochs=config.epochs, iters_per_epoch=iters_per_epoch,
                            warmup_iters=plan.warmup_iters, warmup_bias_lr=config.warmup_bias_lr,
                            warmup_momentum=config.warmup_momentum, momentum=config.momentum,
                            accumulate=plan.accumulate, cosine=config.cos_lr)
        amp_dtype = amp_dtype_for(config.amp, self.device)
        scaler = torch.amp.GradScaler(self.device.type, enabled=amp_dtype == torch.float16)
        return StepContext(model=ranked_model, criterion=self.criterion, optimizer=optimizer, schedule=schedule,
                           scaler=scaler, ema=ModelEMA(self.model) if config.ema else None, device=self.device,
                           amp_dtype=amp_dtype, channels_last=config.channels_last,
                           grad_clip=config.grad_clip)

    def _restore(self, checkpoint: dict) -> None:
        self.ctx.optimizer.load_state_dict(checkpoint["optimizer"])
        self.ctx.scaler.load_state_dict(checkpoint["scaler"])
        if self.ctx.ema is not None:
            self.ctx.ema.module.load_state_dict(checkpoint["model"])
            self.ctx.ema.updates = checkpoint["ema_updates"]
        self.ctx.state = LoopState(**checkpoint["loop"])
        self.start_epoch = checkpoint["epoch"]
        self.best_fitness = checkpoint["best_fitness"]
        self.rows = list(checkpoint["rows"])
        set_rng_state(checkpoint["rng"])
        restore_gradients(self.model, checkpoint.get("grads", {}))
        logger.info("resuming %s from epoch %d%s", self.run_dir, self.start_epoch + 1,
                    f", batch {self.ctx.state.epoch_batches + 1}" if self.ctx.state.epoch_batches else "")

    def loader(self, train: bool, mosaic: bool = True):
        """The training (augmented, shuffled) or validation (letterboxed) DataLoader of this run."""
        config = self.config
        augment = {k: getattr(config, k) for k in AUGMENT_KEYS}
        dataset = self.train_data if train else self.val_data
        return build_dataloader(dataset, train=train, image_size=self.plan.image_size,
                                batch_size=self.plan.batch // self.world if train else self.plan.val_batch,
                                workers=config.workers, seed=config.seed,
                                augment=augment, mosaic=mosaic, device=self.device,
                                fraction=config.fraction if train else 1.0, rank=distributed.rank(),
                                world_size=self.world)

    def fit(self) -> dict[str, float]:
        """Train for the remaining epochs; returns the metrics of best.pt on the validation set.

        The first SIGINT (Ctrl-C) or SIGTERM ends the current batch, saves last.pt there and raises
        KeyboardInterrupt; resume=true continues from that batch.
        """
        with StopRequest() as self.stop:
            return self._fit()

    def _fit(self) -> dict[str, float]:
        config = self.config
        epochs = self.ctx.schedule.epochs
        mosaic = self.start_epoch < self._close_at(epochs) and config.mosaic > 0
        train_loader = self.loader(True, mosaic=mosaic)
        val_loader = self.loader(False) if self.main else None
        if config.plots and self.start_epoch == 0 and self.main:
            self._plot_first_batches(train_loader)
        stale, epoch, run_start = 0, self.start_epoch, time.perf_counter()
        while epoch < epochs:
            if mosaic and epoch >= self._close_at(epochs):
                logger.info("closing mosaic for the last %d epochs", epochs - epoch)
                mosaic, train_loader = False, self.loader(True, mosaic=False)
            set_epoch(train_loader, epoch, skip_batches=self.ctx.state.epoch_batches)
            start = time.perf_counter()
            losses = train_one_epoch(self.ctx, train_loader, epoch=epoch, epochs=epochs,
                                     image_size=self.plan.image_size, progress=self.progress,
                                     stop=self._stop_requested)
            if losses is None:
                self._stop_here(epoch)
            train_time = time.perf_counter() - start
            metrics, improved = None, False
            if self.main and (config.val or epoch == epochs - 1):
                metrics = self.evaluate(val_loader)
                improved = metrics.fitness > self.best_fitness
                self.best_fitness = max(self.best_fitness, metrics.fitness)
                stale = 0 if improved else stale + 1
            distributed.average_gradients(self.model)  # a save inside an accumulation window stores rank 0's
            if self.main:
                self._record(epoch, losses, metrics, train_time, time.perf_counter() - start)
                self._save(epoch, improved)
            if self._stop_requested():  # the signal came during validation or the save
                self._stop_here(epoch)
            epoch += 1
            if config.time:
                epochs = self._refit_epochs(epoch, time.perf_counter() - run_start)
            epochs, stop = distributed.broadcast((epochs, bool(config.patience and stale >= config.patience)))
            if epochs != self.ctx.schedule.epochs:
                self.ctx.schedule = replace(self.ctx.schedule, epochs=epochs)
            if stop:
                logger.info("no improvement for %d epochs: stopping early", stale)
                break
        return self._finish(val_loader)

    def _close_at(self, epochs: int) -> int:
        return max(epochs - self.config.close_mosaic, 0)

    def _refit_epochs(self, done: int, elapsed: float) -> int:
        """Fit the number of epochs to the time budget, and the lr schedule to that number."""
        per_epoch = elapsed / max(done - self.start_epoch, 1)
        remaining = self.config.time * 3600 - elapsed
        epochs = done + max(int(remaining / per_epoch + 0.3), 0)
        if epochs != self.ctx.schedule.epochs:
            logger.info("time budget %.2f h: %.1f s per epoch -> %d epochs", self.config.time, per_epoch, epochs)
        return epochs

    def evaluate(self, loader, final: bool = False) -> DetectionMetrics:
        """COCO metrics of the EMA weights, Conv+BN fused; `final` adds the per-class table and, with plots, images."""
        model = (self.ctx.ema.module if self.ctx.ema is not None else self.model).fused_copy(self.ctx.channels_last)
        detections, image_ids = predict_loader(
            model, loader, device=self.device, category_ids=self.val_data.category_ids, conf=self.config.conf,
            iou=self.config.iou, max_det=self.config.max_det, amp_dtype=self.ctx.amp_dtype,
            classes=self.val_data.classes,
            channels_last=self.ctx.channels_last, progress=self.progress)
        names = dict(zip(self.val_data.category_ids, self.val_data.names, strict=True))
        metrics = coco_evaluate(self.ground_truth, detections, image_ids, names, confusion=final)
        for line in metrics.table(per_class=final):
            logger.info(line)
        if final and self.config.plots:
            plot_validation(model, loader, metrics, self.names, self.run_dir, device=self.device,
                            amp_dtype=self.ctx.amp_dtype, channels_last=self.ctx.channels_last)
        return metrics

    def _record(self, epoch: int, losses: dict[str, float], metrics: DetectionMetrics | None, train_time: float,
                epoch_time: float) -> None:
        """Append one row to results.csv (rewritten atomically) and redraw results.png.

        An epoch without validation leaves its metric cells blank.
        """
        measured = metrics.as_row() if metrics is not None else dict.fromkeys(DetectionMetrics().as_row(), "")
        row = {"epoch": epoch + 1, "time": round(epoch_time, 2), "train_time": round(train_time, 2),
               **{k: round(v, 5) for k, v in losses.items()},
               **{k: v if v == "" else round(v, 5) for k, v in measured.items()},
               "lr": round(self.ctx.optimizer.param_groups[0]["lr"], 7),
               "optimizer_steps": self.ctx.state.optimizer_steps}
        self.rows.append(row)
        buffer = io.StringIO()
        # An epoch whose every batch was skipped (non-finite losses) has no loss columns: they stay blank.
        writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(key for r in self.rows for key in r)))
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.run_dir / "results.csv", buffer.getvalue())
        if self.ctx.state.oom_events:
            atomic_write_text(self.run_dir / "oom_events.json", json.dumps(self.ctx.state.oom_events, indent=1))
        if self.config.plots:
            plot_results(self.run_dir / "results.csv", self.run_dir / "results.png")

    def checkpoint_state(self, epoch: int) -> dict[str, Any]:
        ema = self.ctx.ema
        return {
            "epoch": epoch + 1,
            "model": (ema.module if ema is not None else self.model).state_dict(),
            "raw_model": self.model.state_dict(),
            "ema_updates": ema.updates if ema is not None else 0,
            "optimizer": self.ctx.optimizer.state_dict(),
            "scaler": self.ctx.scaler.state_dict(),
            "loop": asdict(self.ctx.state),
            "best_fitness": self.best_fitness,
            "rows": self.rows,
            "rng": rng_state(),
            "grads": pending_gradients(self.model),
            "config": self.config.to_dict(),
            "plan": asdict(self.plan),
            "model_args": dict(self.model.model_args),
            "names": list(self.names),
            "category_ids": list(self.train_data.category_ids),
        }

    def _save(self, epoch: int, improved: bool) -> None:
        state = self.checkpoint_state(epoch)
        save_checkpoint(self.weights_dir / "last.pt", state)
        if self.config.save_period and (epoch + 1) % self.config.save_period == 0:
            save_checkpoint(self.weights_dir / f"epoch{epoch + 1}.pt", state)  # resumable, as last.pt
        if improved:
            # best.pt is for inference: drop what only resuming needs.
            inference = {k: v for k, v in state.items()
                         if k not in ("raw_model", "optimizer", "scaler", "rng", "grads")}
            save_checkpoint(self.weights_dir / "best.pt", inference)

    def _stop_requested(self) -> bool:
        """Whether a signal arrived, on any rank: under DDP all ranks stop after the same batch."""
        return distributed.any_rank(self.stop(), self.device)

    def _stop_here(self, epoch: int) -> None:
        """Save last.pt in the middle of `epoch` (ctx.state counts its batches done) unless it ended, then stop."""
        done, last = self.ctx.state.epoch_batches, self.weights_dir / "last.pt"
        signal_name = self.stop.signal_name or "a signal to another rank"
        if done:
            distributed.average_gradients(self.model)
            if self.main:
                save_checkpoint(last, {**self.checkpoint_state(epoch), "epoch": epoch})
        where = f"after {done} batches of epoch {epoch + 1}" if done else f"at the end of epoch {epoch + 1}"
        if self.main:
            logger.warning("%s: saved %s %s; continue with resume=true", signal_name, last, where)
        raise KeyboardInterrupt(f"stopped by {signal_name} in epoch {epoch + 1}")

    def _finish(self, val_loader) -> dict[str, float]:
        """Validate best.pt's weights once more and return their metrics (on every rank)."""
        return distributed.on_main(self._validate_best, val_loader)

    def _validate_best(self, val_loader) -> dict[str, float]:
        best = load_checkpoint(self.weights_dir / "best.pt")
        (self.ctx.ema.module if self.ctx.ema is not None else self.model).load_state_dict(best["model"])
        metrics = self.evaluate(val_loader, final=True)
        result = {**metrics.as_row(), "fitness": metrics.fitness, "epochs_run": len(self.rows),
                  "run_dir": str(self.run_dir)}
        logger.info("best.pt (epoch %d): mAP50-95 %.4f mAP50 %.4f; results in %s", best["epoch"],
                    metrics.map50_95, metrics.map50, self.run_dir)
        atomic_write_text(self.run_dir / "metrics.json", json.dumps({**result, **metrics.details()}, indent=1))
        return result

    def _plot_first_batches(self, loader) -> None:
        batch = next(iter(loader))
        plot_batch(batch.images, batch.targets, self.names, self.run_dir / "train_batch0.jpg")
        boxes, classes = self.train_data.all_boxes(self.plan.image_size)
        plot_labels(classes, boxes, self.plan.image_size, self.names, self.run_dir / "labels.png")


def train(overrides: dict[str, Any], progress: bool = True) -> dict[str, float]:
    """Train with defaults < data card < checkpoint (resume) < overrides; returns best.pt's metrics.

    device=0,1 (several GPUs) outside torchrun launches one rank per GPU with torchrun and waits for them.
    """
    setup_logging()
    if "," in str(overrides.get("device", "")) and distributed.world_size() == 1:
        return distributed.launch_ranks(overrides)
    try:
        return Trainer(overrides, progress=progress).fit()
    finally:
        distributed.cleanup()

