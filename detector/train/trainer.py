"""Training orchestration: build each stage in data-flow order, then loop over epochs.

data card -> datasets -> model -> loss -> batch plan -> optimizer/schedule/EMA -> loaders -> epochs
(train_one_epoch, evaluate, results.csv, checkpoints, plots) -> final metrics.

Each stage is built in train/build.py; what checkpoints hold is train/run_state.py, results.csv
train/history.py. Under torchrun every rank runs this with its share of each batch (see distributed.py);
rank 0 alone writes the run folder and validates.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from detector import distributed
from detector.atomic import atomic_write_text
from detector.data.augment import round_image_size
from detector.data.loader import AUGMENT_KEYS, TrainSampling, build_dataloader, set_epoch
from detector.device import device_ops, select_device
from detector.evaluate import validate
from detector.evaluate.metrics import DetectionMetrics, load_ground_truth
from detector.evaluate.plots import plot_batch, plot_labels
from detector.runs import log_run, make_run_dir
from detector.train.build import (
    build_criterion,
    build_datasets,
    build_detector,
    build_step_context,
    resolve_config,
    set_up_process,
    worst_case_boxes,
)
from detector.train.checkpoint import load_checkpoint, save_checkpoint
from detector.train.engine import train_one_epoch
from detector.train.epochs import mosaic_epochs, refit_epochs
from detector.train.history import epoch_row, write_history
from detector.train.interrupt import StopRequest
from detector.train.plan import Plan, auto_batch, make_plan, record_first_epoch, watch_first_epoch
from detector.train.probe import make_probe_step
from detector.train.run_state import restore_training_state, save_epoch, training_state
from detector.train.tensorboard import FIRST_PICTURES, TensorBoardLog

logger = logging.getLogger(__name__)


class Trainer:
    """One training run: set up every stage from the config, then fit().

    What a study of runs (detector/benchmark.py) reads besides fit()'s metrics: `config`, `plan`, `device`,
    `train_size`, `rows` (results.csv), `ctx.noise` (the noise probe handed in), and `measured_step()`.
    """

    def __init__(self, overrides: dict[str, Any], progress: bool = True, noise: Any = None):
        """`noise`: a train.noise_scale.GradientNoiseProbe that observes every batch, or None."""
        self.config, self.card, checkpoint, start = resolve_config(overrides)
        config = self.config
        # Rounded once, so every stage (the RAM cache included) works at the size training uses, warned once.
        self.image_size = round_image_size(config.imgsz)
        self.device = distributed.setup(select_device(config.device))
        self.world, self.main = distributed.world_size(), distributed.is_main()
        self.progress = progress and self.main
        threads = set_up_process(config)
        # Data first: a broken dataset fails here, before a run folder exists.
        self.train_data, self.val_data, self.classes = build_datasets(config, self.card, self.image_size)
        self.names = self.train_data.names
        self.train_size = max(math.ceil(len(self.train_data) * config.fraction), 1)
        self.model = build_detector(config, len(self.names), checkpoint, start).to(self.device)
        self.criterion = build_criterion(config, self.model, self.world)

        self.run_dir = Path(config.resume).parents[1] if checkpoint is not None else distributed.on_main(
            make_run_dir, config.project, config.name, config.exist_ok)
        self.weights_dir = self.run_dir / "weights"
        if self.main:
            self.weights_dir.mkdir(parents=True, exist_ok=True)
        # Rank 0 narrates the run, on the console and in its train.log; the other ranks warn only.
        log_run(self.run_dir / "train.log" if self.main else None, verbose=self.main)
        self.autobatch = None  # AutoBatch's (training, validation) decisions when it chose the batch now
        self.plan = self._plan(threads, checkpoint)
        self.model, self.ctx = build_step_context(config, self.plan, self.model, self.criterion, self.device,
                                                  self.world)
        self.ctx.noise = noise
        self.about = {"config": config.to_dict(), "plan": asdict(self.plan),
                      "model_args": dict(self.model.model_args), "names": list(self.names),
                      "category_ids": list(self.train_data.category_ids)}  # the same in every checkpoint
        self.start_epoch, self.best_fitness, self.rows = 0, -1.0, []
        if checkpoint is not None:
            self._restore(checkpoint)
        self.ground_truth = load_ground_truth(self.val_data.annotation_json, config.single_cls, self.classes)
        self.tensorboard = TensorBoardLog(self.run_dir / "tensorboard" if config.tensorboard and self.main else None,
                                          first_epoch=self.start_epoch, config=config.to_dict(), plan=asdict(self.plan))
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
            return make_plan(config, self.device, threads, image_size=self.image_size, train_size=self.train_size,
                             batch=saved["batch"], batch_source=saved["batch_source"], val_batch=saved["val_batch"],
                             world_size=world)
        if config.auto_batch_fraction is None:
            return make_plan(config, self.device, threads, image_size=self.image_size, train_size=self.train_size,
                             batch=int(config.batch), world_size=world)
        self.autobatch = train, val = auto_batch(
            config, self.model, self.criterion, device=self.device, image_size=self.image_size,
            num_classes=len(self.names), max_boxes=worst_case_boxes(self.train_data, config.mosaic, config.mixup),
            train_size=math.ceil(self.train_size / world), val_size=len(self.val_data), run_dir=self.run_dir,
            save=self.main, world_size=world)
        per_rank = distributed.agree_on_batch(train.batch, self.device)
        return make_plan(config, self.device, threads, image_size=self.image_size, train_size=self.train_size,
                         batch=per_rank * world, batch_source=train.decided_by, val_batch=val.batch, world_size=world)

    def measured_step(self, inputs: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None
                      ) -> Callable[[int], None]:
        """This run's training step on model copies, as AutoBatch measures it: on `inputs(b)` or the worst case."""
        config = self.config
        return make_probe_step(self.model, self.criterion, image_size=self.plan.max_image_size,
                               max_boxes=max(worst_case_boxes(self.train_data, config.mosaic, config.mixup), 1),
                               num_classes=len(self.names),
                               device=self.device, amp_dtype=self.ctx.amp_dtype, channels_last=config.channels_last,
                               optimizer_name=self.plan.optimizer, ema=config.ema, grad_clip=config.grad_clip,
                               seed=config.seed, inputs=inputs)

    def _restore(self, checkpoint: dict) -> None:
        restore_training_state(self.ctx, self.model, checkpoint)
        self.start_epoch, self.best_fitness = checkpoint["epoch"], checkpoint["best_fitness"]
        self.rows = list(checkpoint["rows"])
        logger.info("resuming %s from epoch %d%s", self.run_dir, self.start_epoch + 1,
                    f", batch {self.ctx.state.epoch_batches + 1}" if self.ctx.state.epoch_batches else "")

    def loader(self, train: bool, mosaic: bool = True):
        """The training (augmented, shuffled; mosaic=False: neither mosaic nor mixup) or validation DataLoader."""
        config, plan = self.config, self.plan
        if not train:
            return build_dataloader(self.val_data, train=False, image_size=plan.image_size, batch_size=plan.val_batch,
                                    workers=config.workers, seed=config.seed, device=self.device)
        sampling = TrainSampling(augment={k: getattr(config, k) for k in AUGMENT_KEYS}, mosaic=mosaic,
                                 multi_scale=config.multi_scale, fraction=config.fraction, rank=distributed.rank(),
                                 world_size=self.world)
        return build_dataloader(self.train_data, train=True, image_size=plan.image_size, batch_size=plan.rank_batch,
                                workers=config.workers, seed=config.seed, device=self.device, sampling=sampling)

    def fit(self) -> dict[str, float]:
        """Train for the remaining epochs; returns the metrics of best.pt on the validation set.

        The first SIGINT (Ctrl-C) or SIGTERM ends the current batch, saves last.pt there and raises
        KeyboardInterrupt; resume=true continues from that batch.
        """
        with StopRequest() as self.stop:
            return self._fit()

    def _fit(self) -> dict[str, float]:
        config, epochs = self.config, self.ctx.schedule.epochs
        mosaic = (config.mosaic or config.mixup) > 0 and self.start_epoch < mosaic_epochs(epochs, config.close_mosaic,
                                                                                           log=True)
        train_loader = self.loader(True, mosaic=mosaic)
        val_loader = self.loader(False) if self.main else None
        if config.plots and self.start_epoch == 0 and self.main:
            self._plot_first_batches(train_loader)
        stale, epoch, run_start = 0, self.start_epoch, time.perf_counter()
        while epoch < epochs:
            if mosaic and epoch >= mosaic_epochs(epochs, config.close_mosaic):
                logger.info("closing mosaic and mixup for the last %d epochs", epochs - epoch)
                mosaic, train_loader = False, self.loader(True, mosaic=False)
            set_epoch(train_loader, epoch, skip_batches=(skipped := self.ctx.state.epoch_batches))
            self.tensorboard.start_epoch(device_ops(self.device))
            watch = self.autobatch is not None and epoch == 0 and watch_first_epoch(self.device)
            start = time.perf_counter()
            losses = train_one_epoch(self.ctx, train_loader, epoch=epoch, epochs=epochs, progress=self.progress,
                                     stop=self._stop_requested)
            if losses is None:
                self._stop_here(epoch)
            if watch:
                record_first_epoch(self.autobatch, self.device, self.run_dir / "autobatch.json", save=self.main)
            train_time = time.perf_counter() - start
            metrics, improved = None, False
            if self.main and (config.val or epoch == epochs - 1):
                metrics = self.evaluate(val_loader)
                improved = metrics.fitness > self.best_fitness
                self.best_fitness = max(self.best_fitness, metrics.fitness)
                stale = 0 if improved else stale + 1
            distributed.average_gradients(self.model)  # a save inside an accumulation window stores rank 0's
            if self.main:
                self._record(epoch, losses, metrics, train_time, time.perf_counter() - start, skipped)
                self._save(epoch, improved)
            if self._stop_requested():  # the signal came during validation or the save
                self._stop_here(epoch)
            epoch += 1
            if config.time:
                epochs = refit_epochs(config.time, done=epoch, start_epoch=self.start_epoch,
                                      elapsed=time.perf_counter() - run_start, epochs=epochs)
            epochs, stop = distributed.broadcast((epochs, bool(config.patience and stale >= config.patience)))
            if epochs != self.ctx.schedule.epochs:
                self.ctx.schedule = replace(self.ctx.schedule, epochs=epochs)
            if stop:
                logger.info("no improvement for %d epochs: stopping early", stale)
                break
        return self._finish(val_loader)

    def evaluate(self, loader, final: bool = False) -> DetectionMetrics:
        """COCO metrics of the EMA weights, Conv+BN fused; `final` adds the per-class table and, with plots, images."""
        model = (self.ctx.ema.module if self.ctx.ema is not None else self.model).fused_copy(self.ctx.channels_last)
        return validate.evaluate(model, loader, self.ground_truth, dataset=self.val_data, device=self.device,
                                 conf=self.config.conf, iou=self.config.iou, max_det=self.config.max_det,
                                 amp_dtype=self.ctx.amp_dtype, channels_last=self.ctx.channels_last,
                                 progress=self.progress, final=final,
                                 plot_dir=self.run_dir if self.config.plots else None).metrics

    def _record(self, epoch: int, losses: dict[str, float], metrics: DetectionMetrics | None, train_time: float,
                epoch_time: float, skipped: int) -> None:
        """Append the epoch's row to results.csv (rewritten atomically), redraw results.png, and with tensorboard
        log the row there with the images/s of the epoch's batches after the `skipped` ones (a resumed epoch's)."""
        self.rows.append(epoch_row(epoch, losses, metrics, train_time=train_time, epoch_time=epoch_time,
                                   lr=self.ctx.optimizer.param_groups[0]["lr"],
                                   optimizer_steps=self.ctx.state.optimizer_steps))
        write_history(self.run_dir, self.rows, oom_events=self.ctx.state.oom_events, plots=self.config.plots)
        self.tensorboard.epoch(self.rows[-1], images=max(self.train_size - skipped * self.plan.batch, 0),
                               ops=device_ops(self.device), batch=self.plan.batch, accumulate=self.plan.accumulate)

    def checkpoint_state(self, epoch: int) -> dict[str, Any]:
        """This run's checkpoint after `epoch` (0-based) as plain data (train/run_state.py)."""
        return training_state(self.ctx, self.model, epoch=epoch, best_fitness=self.best_fitness, rows=self.rows,
                              about=self.about)

    def _save(self, epoch: int, improved: bool) -> None:
        save_epoch(self.weights_dir, self.checkpoint_state(epoch), save_period=self.config.save_period,
                   improved=improved)

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
        self.tensorboard.close(self.run_dir, step=len(self.rows))
        return result

    def _plot_first_batches(self, loader) -> None:
        batch = next(iter(loader))
        plot_batch(batch.images, batch.targets, self.names, self.run_dir / "train_batch0.jpg")
        boxes, classes = self.train_data.all_boxes(self.plan.image_size)
        plot_labels(classes, boxes, self.plan.image_size, self.names, self.run_dir / "labels.png")
        self.tensorboard.pictures(self.run_dir, FIRST_PICTURES, step=0)


def train(overrides: dict[str, Any], progress: bool = True) -> dict[str, float]:
    """Train with defaults < data card < checkpoint (resume) < overrides; returns best.pt's metrics.

    device=0,1 (several GPUs) outside torchrun launches one rank per GPU with torchrun and waits for them.
    """
    if "," in str(overrides.get("device", "")) and distributed.world_size() == 1:
        return distributed.launch_ranks(overrides)
    try:
        return Trainer(overrides, progress=progress).fit()
    finally:
        distributed.cleanup()

