"""What batch size does to speed, memory and accuracy, measured on your data and hardware.

    detector benchmark data=shapes.yaml model=n batches=2,4,8,16,-1 epochs=4 imgsz=256 [seeds=0,1]
                       [policies=nbs,linear,sqrt,none] [budget=SECONDS] [name=...]

For each batch, each lr policy and each seed a run is trained (the same seed gives every batch the same
initial weights; batch=-1 lets AutoBatch choose): for the same number of images (epochs=), or with budget= for
the same wall-clock seconds each (the trainer's time= budget, epochs refitted after each epoch). Each run is
measured: wall time per epoch, training images/s (steady state, loading included), images/s
of the training step alone, peak memory, optimizer steps, final mAP, and the gradient noise scale
B_simple (a critical-batch-size hint). Over the seeds each (policy, batch) gets the mean and spread of
mAP50-95, differences to the best smaller than the spread are marked "within noise", and one batch is
recommended (detector/benchmark_summary.py). Results go to runs/benchmark/<name>/: results.csv (one row per
run), table.md (runs, summary, recommendation) and four plots (the first policy's first seed); the tables
and the recommendation are printed too.
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
from detector.benchmark_summary import COLUMNS, markdown_table, median_noise_scale, recommend, summarize, summary_table
from detector.config import LR_POLICIES, check_keys, parse_cli
from detector.device import device_ops
from detector.errors import ConfigError
from detector.evaluate.plots import plot_curves
from detector.runs import make_run_dir
from detector.train.noise_scale import GradientNoiseProbe
from detector.train.trainer import Trainer

logger = logging.getLogger(__name__)

STUDY_KEYS = ("batches", "seeds", "policies", "budget")  # the benchmark's own settings, beside the training ones


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


def parse_seeds(text: str | list) -> list[int]:
    """'0,1' or [0, 1] -> [0, 1]: the seeds each batch is trained with."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        seeds = [int(item) for item in items]
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid value seeds={text!r}: expected comma-separated integers like 0,1") from err
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"invalid value seeds={text!r}: give distinct comma-separated integers like 0,1")
    return seeds


def parse_policies(text: str | list) -> list[str]:
    """'nbs,linear' or ['nbs', 'linear'] -> ['nbs', 'linear'], each one of the lr policies."""
    policies = [str(item).strip() for item in (text.split(",") if isinstance(text, str) else text)]
    for policy in policies:
        if policy not in LR_POLICIES:
            raise ConfigError(f"invalid policy {policy!r} in policies={text!r}: each must be one of "
                              + ", ".join(LR_POLICIES))
    if not policies:
        raise ConfigError("policies= is empty: give comma-separated lr policies like nbs,linear")
    return policies


def parse_budget(text: str | float) -> float:
    """budget=SECONDS of wall-clock training per run, > 0."""
    try:
        seconds = float(text)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid value budget={text!r}: expected seconds of training per run, like 120") from err
    if not seconds > 0 or not math.isfinite(seconds):
        raise ConfigError(f"invalid value budget={text!r}: expected seconds of training per run > 0")
    return seconds


def run_cli(argv: list[str]) -> list[dict[str, Any]]:
    """`detector benchmark key=value ...`: the STUDY_KEYS go to benchmark, every other key to training."""
    study = {key: value for key, _, value in (a.partition("=") for a in argv) if key in STUDY_KEYS}
    overrides = parse_cli([a for a in argv if a.partition("=")[0] not in STUDY_KEYS])
    return benchmark(study.pop("batches", "2,4,8,16,-1"), **study, **overrides)


def benchmark(batches: list[float] | str, *, seeds: list[int] | str | None = None,
              policies: list[str] | str | None = None, budget: float | str | None = None,
              progress: bool = True, **overrides: Any) -> list[dict[str, Any]]:
    """Train once per lr policy, batch setting and seed, measure each run, summarize and recommend (module
    docstring).

    Args:
        batches: batch settings, e.g. [2, 4, 8, 16, -1] or "2,4,8,16,-1".
        seeds: seeds each batch is trained with (default: the seed setting alone).
        policies: lr policies each batch is trained under (default: the lr_policy setting alone).
        budget: wall-clock seconds of training per run (default: none, the same epochs for every run).
        progress: show progress bars.
        overrides: training settings shared by every run (data, model, epochs, imgsz, ...); project defaults to
            runs/benchmark, name to the data card's name.

    Returns:
        One row per run with the COLUMNS, policies outermost, then batches, then seeds.
    """
    batches = parse_batches(batches)
    check_keys(overrides)
    for key, given in (("batch", True), ("resume", True), ("seed", seeds is not None),
                       ("lr_policy", policies is not None), ("time", budget is not None)):
        if given and key in overrides:
            raise ConfigError(f"{key}= is not a benchmark setting here: the benchmark sets it for each run itself")
    if budget is not None:
        overrides["time"] = parse_budget(budget) / 3600
    folder = make_run_dir(overrides.pop("project", "runs/benchmark"),
                          overrides.pop("name", Path(str(overrides.get("data", "shapes"))).stem),
                          bool(overrides.pop("exist_ok", False)))
    policy_list = parse_policies(policies) if policies is not None else [overrides.get("lr_policy")]
    seed_list = parse_seeds(seeds) if seeds is not None else [overrides.get("seed")]
    rows, curves = [], {}
    for policy in policy_list:
        for batch in batches:
            for seed in seed_list:
                settings = {**overrides, **({} if policy is None else {"lr_policy": policy}),
                            **({} if seed is None else {"seed": seed})}
                name = _run_name(batch, policy if policies is not None else None, seed if seeds is not None else None)
                row, curve = _run_one(batch, name, folder, settings, progress)
                rows.append(row)
                if policy == policy_list[0] and seed == seed_list[0]:
                    curves[f"batch {row['batch']}" + (" (AutoBatch)" if batch < 1 else "")] = curve
    _write(rows, curves, folder, budget is not None)
    return rows


def _run_name(batch: float, policy: str | None, seed: int | None) -> str:
    name = "batch" + ("auto" if batch == -1 else f"{batch:g}")
    return name + (f"_{policy}" if policy else "") + (f"_seed{seed}" if seed is not None else "")


def _run_one(batch: float, name: str, folder: Path, overrides: dict, progress: bool) -> tuple[dict, tuple]:
    trainer = Trainer({**overrides, "batch": batch, "project": str(folder), "name": name,
                       "exist_ok": True, "plots": False}, progress=progress, noise=GradientNoiseProbe())
    ops = device_ops(trainer.device)
    ops.reset_peak()
    metrics = trainer.fit()
    plan, config = trainer.plan, trainer.config
    peak = ops.peak_reserved() if ops.kind == "cuda" else None
    capacity = ops.mem_get_info()[1]
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
        "asked": f"{batch:g}", "seed": config.seed, "batch": plan.batch, "device_batch": plan.rank_batch,
        "decided_by": plan.batch_source, "lr_policy": config.lr_policy,
        "accumulate": plan.accumulate, "images_per_step": plan.batch * plan.accumulate, "lr0": round(plan.lr0, 6),
        "epochs": len(rows), "epoch_s": round(statistics.median(epoch_seconds), 2),
        "train_img_s": round(trainer.train_size * len(steady) / sum(steady), 2),
        "step_img_s": round(step_sample.images_per_second, 2),
        "peak_gib": round((peak or step_sample.peak_bytes) / GIB, 4), "capacity_gib": round(capacity / GIB, 2),
        "optimizer_steps": trainer.ctx.state.optimizer_steps, "run_s": round(sum(epoch_seconds), 2),
        "map50_95": round(metrics["metrics/mAP50-95"], 4),
        "map50": round(metrics["metrics/mAP50"], 4),
        "noise_scale": _rounded(trainer.ctx.noise.estimate.value),
    }
    logger.info("benchmark %s: %s", name, result)
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


def _write(rows: list[dict], curves: dict[str, tuple], folder: Path, budget: bool) -> None:
    lines = [",".join(COLUMNS)] + [",".join(str(row[c]) for c in COLUMNS) for row in rows]
    atomic_write_text(folder / "results.csv", "\n".join(lines) + "\n")
    groups = summarize(rows)
    noise = median_noise_scale([row["noise_scale"] for row in rows])
    answer = recommend(groups, noise, budget=budget)
    table = "\n\n".join((markdown_table(rows), summary_table(groups, noise), answer.text))
    atomic_write_text(folder / "table.md", table + "\n")
    print(table)
    first = (rows[0]["lr_policy"], rows[0]["seed"])
    rows = [row for row in rows if (row["lr_policy"], row["seed"]) == first]  # the plots show one run per batch
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
