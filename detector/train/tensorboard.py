"""TensorBoard logging of a run (tensorboard=true): run_dir/tensorboard holds the numbers of results.csv and a
few more, the run's pictures and its settings.

Scalars, one point per epoch (the step is results.csv's epoch column): every number of an epoch's results.csv row
under the column's own name (train/loss_box, metrics/mAP50-95, lr, ...), and train/images_per_s,
train/peak_memory_gib, train/batch and train/accumulate. Pictures (with plots=true): train_batch0 and labels at
step 0, val_batch0_labels, val_batch0_pred and results at the last epoch. Settings: the config and the plan's batch,
accumulation, lr and optimizer in the HParams tab, with mAP50-95 and mAP50 as its metrics. The package is optional
(pip install tensorboard); rank 0 alone writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2

from detector.device import DeviceOps
from detector.errors import ConfigError

INSTALL = "pip install tensorboard (or pip install '.[tensorboard]' in a checkout of this package)"
FIRST_PICTURES = ("train_batch0.jpg", "labels.png")  # written before the first epoch
LAST_PICTURES = ("val_batch0_labels.jpg", "val_batch0_pred.jpg", "results.png")  # written by the last validation
HPARAM_METRICS = ("metrics/mAP50-95", "metrics/mAP50")


def summary_writer_class() -> type:
    """torch's SummaryWriter.

    Raises:
        ConfigError: the tensorboard package is not installed (the message gives the pip command).
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ConfigError(f"tensorboard=true needs the tensorboard package, which is not installed: {INSTALL}; "
                          "or leave tensorboard=false") from err
    return SummaryWriter


class TensorBoardLog:
    """The event files of one run in `log_dir`, or (log_dir None: tensorboard=false, or a rank other than 0) a log
    whose methods do nothing.

    A resumed run (`first_epoch` > 0) appends to them; TensorBoard then drops what a killed process had logged
    at or after the resumed epoch (purge_step), so every epoch keeps one point. The settings are written by the run's
    first process (`first_epoch` 0).
    """

    def __init__(self, log_dir: Path | None, *, first_epoch: int = 0, config: dict[str, Any] | None = None,
                 plan: dict[str, Any] | None = None) -> None:
        self.writer = None
        if log_dir is not None:
            writer_class = summary_writer_class()
            self.writer = writer_class(str(log_dir), purge_step=first_epoch + 1 if first_epoch else None)
            if first_epoch == 0 and config is not None and plan is not None:
                self._settings(config, plan)

    def _settings(self, config: dict[str, Any], plan: dict[str, Any]) -> None:
        """The run's settings in the HParams tab, scored by the epochs' mAP50-95 and mAP50 scalars."""
        from torch.utils.tensorboard.summary import hparams

        values = {**config, **{f"plan/{k}": plan[k] for k in ("batch", "accumulate", "lr0", "optimizer")}}
        values = {k: v for k, v in values.items() if isinstance(v, bool | int | float | str)}
        writer = self.writer._get_file_writer()  # add_hparams would open a second run for them
        for summary in hparams(values, dict.fromkeys(HPARAM_METRICS, 0.0)):
            writer.add_summary(summary)

    def start_epoch(self, ops: DeviceOps) -> None:
        """Start the epoch's peak memory (the training device's `ops`)."""
        if self.writer is not None:
            ops.reset_peak()

    def epoch(self, row: dict[str, Any], *, images: int, ops: DeviceOps, batch: int, accumulate: int) -> None:
        """An epoch's results.csv row (blank cells left out) and its speed, peak memory, batch and accumulation.

        Args:
            row: results.csv's row (its `epoch` is the step).
            images: the images the epoch trained on in its `row["train_time"]` seconds.
            ops: the training device: its peak since start_epoch, validation included (CUDA: the allocator's
                reserved memory; a CPU: the process's resident set now).
        """
        if self.writer is None:
            return
        step = int(row["epoch"])
        scalars = {key: value for key, value in row.items() if key != "epoch" and value != ""}
        scalars.update({"train/images_per_s": images / max(float(row["train_time"]), 1e-9),
                        "train/peak_memory_gib": ops.peak_reserved() / 2**30,
                        "train/batch": batch, "train/accumulate": accumulate})
        for key, value in scalars.items():
            self.writer.add_scalar(key, float(value), step)
        self.writer.flush()

    def pictures(self, run_dir: Path, names: tuple[str, ...], step: int) -> None:
        """The run's pictures among `names` that exist, under pictures/<name without suffix>."""
        if self.writer is None:
            return
        for name in names:
            image = cv2.imread(str(run_dir / name), cv2.IMREAD_COLOR)
            if image is not None:
                self.writer.add_image(f"pictures/{Path(name).stem}", cv2.cvtColor(image, cv2.COLOR_BGR2RGB), step,
                                      dataformats="HWC")
        self.writer.flush()

    def close(self, run_dir: Path, step: int) -> None:
        """Log the pictures of the last validation (LAST_PICTURES) at `step`, the last epoch, and close the files."""
        self.pictures(run_dir, LAST_PICTURES, step)
        if self.writer is not None:
            self.writer.close()
