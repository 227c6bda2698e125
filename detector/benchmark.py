"""What batch size does to speed, memory and accuracy, measured on your data and hardware.

    detector benchmark data=shapes.yaml model=n batches=2,4,8,16,-1 epochs=4 imgsz=256 [name=...]

For each batch the same run is trained from the same seed and initial weights (batch=-1 lets AutoBatch
choose), then measured: wall time per epoch, training images/s (steady state, loading included), images/s
of the training step alone, peak memory, optimizer steps, final mAP, and the gradient noise scale
B_simple (a critical-batch-size hint). Results go to runs/benchmark/<name>/: results.csv, table.md and
four plots; the table is printed too.
"""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from detector.atomic import atomic_write_text
from detector.autobatch.choose import TIMED_RUNS, measure
from detector.autobatch.memory import probe_for
from detector.autobatch.records import GIB, Sample, fit_memory
from detector.config import check_keys
from detector.device import device_ops
from detector.errors import ConfigError
from detector.evaluate.plots import plot_curves
from detector.runs import make_run_dir
from detector.train.noise_scale import GradientNoiseProbe
from detector.train.trainer import Trainer

logger = logging.getLogger(__name__)

COLUMNS = ("asked", "batch", "decided_by", "lr_policy", "accumulate", "images_per_step", "lr0", "epochs",
           "epoch_s", "train_img_s", "step_img_s", "peak_gib", "optimizer_steps", "map50_95", "map50", "noise_scale")


def parse_batches(text: str | list) -> list[float]:
    """'2,4,-1' or [2, 4, -1] -> [2.0, 4.0, -1.0], each a valid batch setting (N >= 1, -1 or 0 < f < 1)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    batches = []
    for item in items:
        try:
            value = float(item)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"invalid value batches={text!r}: expected comma-separated batch sizes like 2,4,8,-1"
                              ) from err
        if not (value == -1 or 0 < value < 1 or (value >= 1 and value.is_integer())):
            raise ConfigError(f"invalid batch {item!r} in batches={text!r}: each must be N >= 1, -1 or 0 < f < 1")
        batches.append(value)
    if not batches:
        raise ConfigError("batches= is empty: give comma-separated batch sizes like 2,4,8,-1")
    return batches


def benchmark(batches: list[float] | str, *, progress: bool = True, **overrides: Any) -> list[dict[str, Any]]:
    """Train once per batch setting and measure each run (see the module docstring).

    Args:
        batches: batch settings, e.g. [2, 4, 8, 16, -1] or "2,4,8,16,-1".
        progress: show progress bars.
        overrides: training settings shared by every run (data, model, epochs, imgsz, lr_policy, ...);
            project defaults to runs/benchmark, name to the data card's name.

    Returns:
        One row per batch setting with the COLUMNS.
    """
    batches = parse_batches(batches)
    check_keys(overrides)
    for key in ("batch", "resume"):
        if key in overrides:
            raise ConfigError(f"{key}= is not a benchmark setting: the benchmark sets the batch of each run itself")
    folder = make_run_dir(overrides.pop("project", "runs/benchmark"),
                          overrides.pop("name", Path(str(overrides.get("data", "shapes"))).stem),
                          bool(overrides.pop("exist_ok", False)))
    rows, curves = [], {}
    for batch in batches:
        label = "auto" if batch == -1 else f"{batch:g}"
        row, curve = _run_one(batch, label, folder, overrides, progress)
        rows.append(row)
        curves[f"batch {row['batch']}" + (" (AutoBatch)" if batch < 1 else "")] = curve
    _write(rows, curves, folder)
    return rows


def _run_one(batch: float, label: str, folder: Path, overrides: dict, progress: bool) -> tuple[dict, tuple]:
    trainer = Trainer({**overrides, "batch": batch, "project": str(folder), "name": f"batch{label}",
                       "exist_ok": True, "plots": False}, progress=progress, noise=GradientNoiseProbe())
    ops = device_ops(trainer.device)
    ops.reset_peak()
    metrics = trainer.fit()
    plan, config = trainer.plan, trainer.config
    peak = ops.peak_reserved() if ops.kind == "cuda" else None
    step_sample = _step_alone(trainer)
    rows = trainer.rows
    # The noise probe's extra passes are not training: take their time out of each epoch's.
    probe_seconds = [0.0] * len(rows)
    for iteration, seconds in trainer.ctx.noise.seconds:
        probe_seconds[min((iteration - 1) // plan.batches_per_epoch, len(rows) - 1)] += seconds
    epoch_seconds = [float(r["time"]) - p for r, p in zip(rows, probe_seconds, strict=True)]
    train_seconds = [float(r["train_time"]) - p for r, p in zip(rows, probe_seconds, strict=True)]
    steady = train_seconds[1:] or train_seconds  # the first epoch starts the loader workers, warms kernels
    elapsed, times, maps = 0.0, [], []
    for row, seconds in zip(rows, epoch_seconds, strict=True):
        elapsed += seconds
        if row["metrics/mAP50-95"] != "":
            times.append(elapsed / 60)
            maps.append(float(row["metrics/mAP50-95"]))
    result = {
        "asked": f"{batch:g}", "batch": plan.batch, "decided_by": plan.batch_source, "lr_policy": config.lr_policy,
        "accumulate": plan.accumulate, "images_per_step": plan.batch * plan.accumulate, "lr0": round(plan.lr0, 6),
        "epochs": len(rows), "epoch_s": round(statistics.median(epoch_seconds), 2),
        "train_img_s": round(trainer.train_size * len(steady) / sum(steady), 2),
        "step_img_s": round(step_sample.images_per_second, 2),
        "peak_gib": round((peak or step_sample.peak_bytes) / GIB, 4),
        "optimizer_steps": trainer.ctx.state.optimizer_steps, "map50_95": round(metrics["metrics/mAP50-95"], 4),
        "map50": round(metrics["metrics/mAP50"], 4),
        "noise_scale": _rounded(trainer.ctx.noise.estimate.value),
    }
    logger.info("benchmark batch %s: %s", label, result)
    return result, (times, maps)


def _rounded(value: float | None) -> float:
    return float("nan") if value is None else round(value, 1)


def _step_alone(trainer: Trainer) -> Sample:
    """Peak memory and time of the training step alone on a real batch of the run's size (after one
    warm-up step), on copies of the model: what the loop would reach if loading cost nothing."""
    real = next(iter(trainer.loader(True, mosaic=trainer.config.mosaic > 0)))
    step = trainer.measured_step(inputs=lambda b: (real.images[:b], real.targets[real.targets[:, 0] < b]))
    batch = trainer.plan.rank_batch
    probe = probe_for(trainer.device)
    measure(step, probe, batch)
    return measure(step, probe, batch, timed_runs=TIMED_RUNS)


def _write(rows: list[dict], curves: dict[str, tuple], folder: Path) -> None:
    lines = [",".join(COLUMNS)] + [",".join(str(row[c]) for c in COLUMNS) for row in rows]
    atomic_write_text(folder / "results.csv", "\n".join(lines) + "\n")
    table = markdown_table(rows)
    atomic_write_text(folder / "table.md", table + "\n")
    print(table)
    # Lines join one run per batch (a fixed batch's, if AutoBatch picked the same); AutoBatch's runs are
    # drawn as separate points on the plots where their figures differ.
    fixed = {r["batch"]: r for r in rows if r["decided_by"] != "fixed"}
    fixed.update({r["batch"]: r for r in rows if r["decided_by"] == "fixed"})
    ordered = [fixed[b] for b in sorted(fixed)]
    auto = [r for r in rows if r["decided_by"] != "fixed"]
    x = [r["batch"] for r in ordered]

    def with_auto(series: dict[str, str]) -> dict[str, tuple]:
        curves = {name: (x, [r[key] for r in ordered]) for name, key in series.items()}
        for row in auto:
            for name, key in series.items():
                curves[f"AutoBatch run (batch {row['batch']}): {name}"] = ([row["batch"]], [row[key]])
        return curves

    plot_curves(with_auto({"training loop (loading included)": "train_img_s", "training step alone": "step_img_s"}),
                "batch", "images/s", folder / "speed.png", title="Throughput vs batch", log_x=True)
    fit = fit_memory([Sample(r["batch"], int(r["peak_gib"] * GIB), 1.0) for r in ordered])
    fitted = {}
    if fit is not None:
        xs = np.geomspace(min(x), max(x), 50)  # dense, so the straight fit is drawn right on the log axis
        fitted[f"fit: {fit.fixed_bytes / GIB:.3g} GiB + {fit.per_image_bytes / GIB:.3g} GiB/img"] = (
            xs, [fit.predict(b) / GIB for b in xs])
    plot_curves({"peak memory": (x, [r["peak_gib"] for r in ordered])}, "batch", "GiB", folder / "memory.png",
                title="Peak memory of a training step vs batch", log_x=True, fitted=fitted)
    plot_curves(with_auto({"mAP50-95": "map50_95", "mAP50": "map50"}), "batch", "mAP", folder / "map.png",
                title="Final mAP vs batch", log_x=True)
    plot_curves(curves, "wall time (min)", "mAP50-95", folder / "map_vs_time.png",
                title="mAP50-95 vs wall time, per batch")


def markdown_table(rows: list[dict]) -> str:
    """The benchmark rows as a markdown table, and the noise-scale hint under it."""
    head = ("| batch asked | batch | decided by | lr policy | accumulate | images/step | lr0 | epochs | s/epoch "
            "| train img/s | step img/s | peak GiB | optimizer steps | mAP50-95 | mAP50 | B_simple |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, c) for c in COLUMNS) + " |")
    noise = [row["noise_scale"] for row in rows if math.isfinite(row["noise_scale"])]
    unresolved = sum(row["noise_scale"] == math.inf for row in rows)
    if noise:
        median = statistics.median(noise)
        note = f" ({unresolved} run(s) only as above twice their images per step)" if unresolved else ""
        lines.append(f"\nGradient noise scale B_simple, median over {len(noise)} run(s): {median:.0f} images{note}. "
                     "Images per optimizer step well below B_simple turn extra images into nearly proportional "
                     "progress per step; well above it, more images per step mostly add compute.")
    return "\n".join(lines)


def _cell(row: dict, column: str) -> str:
    """An infinite noise scale means the gradient's signal stayed below its noise at the batch sizes
    measured: the scale is beyond about twice the images per step (the largest batch measured)."""
    if column == "noise_scale" and row[column] == math.inf:
        return f"> {2 * row['images_per_step']}"
    return str(row[column])
