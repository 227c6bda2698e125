"""From the batch-size benchmark's runs to an answer: mean and spread of mAP over seeds, which differences are
within noise, each batch's goodput, and the batch to use.

Goodput (Pollux, Qiao et al., OSDI 2021) weighs throughput by statistical efficiency, the progress one image
makes at B images per optimizer step relative to a base of B0 images per step:

    efficiency(B) = (B_noise + B0) / (B_noise + B)
    goodput(B)    = images/s at B  x  efficiency(B)

with B_noise the gradient noise scale, here the measured B_simple (detector/train/noise_scale.py). Far below
B_noise an extra image per step is nearly a whole image of progress (efficiency near 1); far above it, extra
images per step mostly add compute.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

COLUMNS = ("asked", "seed", "batch", "device_batch", "decided_by", "lr_policy", "accumulate", "images_per_step",
           "lr0", "epochs", "epoch_s", "train_img_s", "step_img_s", "peak_gib", "capacity_gib", "optimizer_steps",
           "run_s", "map50_95", "map50", "noise_scale")
BATCHNORM_FLOOR = 8  # images per device below which BatchNorm's batch statistics get noisy


@dataclass(frozen=True)
class Group:
    """The runs of one (lr policy, batch asked) over its seeds; mAP is mAP50-95, times and speeds are means."""

    policy: str
    asked: str
    batch: int
    device_batch: int
    images_per_step: int
    seeds: int
    map_mean: float
    map_min: float
    map_max: float
    map_std: float
    run_s: float
    train_img_s: float
    peak_gib: float
    capacity_gib: float

    @property
    def spread(self) -> float:
        """Max minus min of mAP50-95 between seeds (0 with one seed)."""
        return self.map_max - self.map_min

    @property
    def label(self) -> str:
        return f"batch {self.batch} (lr_policy {self.policy})"


def summarize(rows: list[dict]) -> list[Group]:
    """Group run rows (benchmark COLUMNS) by (lr_policy, asked), in the order they first appear."""
    keys = list(dict.fromkeys((row["lr_policy"], row["asked"]) for row in rows))
    groups = []
    for policy, asked in keys:
        runs = [row for row in rows if (row["lr_policy"], row["asked"]) == (policy, asked)]
        maps = [float(row["map50_95"]) for row in runs]
        groups.append(Group(
            policy=policy, asked=asked, batch=runs[0]["batch"], device_batch=runs[0]["device_batch"],
            images_per_step=runs[0]["images_per_step"], seeds=len(runs), map_mean=statistics.fmean(maps),
            map_min=min(maps), map_max=max(maps), map_std=statistics.stdev(maps) if len(maps) > 1 else 0.0,
            run_s=statistics.fmean(float(row["run_s"]) for row in runs),
            train_img_s=statistics.fmean(float(row["train_img_s"]) for row in runs),
            peak_gib=max(float(row["peak_gib"]) for row in runs), capacity_gib=float(runs[0]["capacity_gib"])))
    return groups


def versus_best(groups: list[Group]) -> list[str]:
    """Per group, its mean mAP50-95 against the best group's: "best", or the gap and whether it is within noise,
    i.e. no larger than the seed spread (max - min) of either of the two."""
    best = max(groups, key=lambda g: g.map_mean)
    notes = []
    for group in groups:
        gap = best.map_mean - group.map_mean
        noise = max(best.spread, group.spread)
        if group is best:
            notes.append("best")
        elif min(best.seeds, group.seeds) < 2:
            notes.append(f"-{gap:.4f} (one seed: noise unknown)")
        else:
            verdict = "within noise" if gap <= noise else "beyond noise"
            notes.append(f"-{gap:.4f}, {verdict} (seed spread {noise:.4f})")
    return notes


def median_noise_scale(values: list[float]) -> float:
    """The median of the finite B_simple estimates; inf when every resolved estimate was unbounded, nan if none."""
    finite = [v for v in values if math.isfinite(v)]
    if finite:
        return statistics.median(finite)
    return math.inf if any(v == math.inf for v in values) else math.nan


def efficiency(images_per_step: float, noise_scale: float, base_images_per_step: float) -> float:
    """Pollux statistical efficiency (B_noise + B0) / (B_noise + B) (module docstring); 1 for B_noise = inf."""
    if noise_scale == math.inf:
        return 1.0
    return (noise_scale + base_images_per_step) / (noise_scale + images_per_step)


def goodput(images_per_second: float, images_per_step: float, noise_scale: float,
            base_images_per_step: float) -> float:
    """Pollux goodput: images/s times the statistical efficiency of `images_per_step` against the base."""
    return images_per_second * efficiency(images_per_step, noise_scale, base_images_per_step)


@dataclass(frozen=True)
class Recommendation:
    """The batch to use (None when every one was refused) and the sentence that says why."""

    group: Group | None
    text: str


def refusals(groups: list[Group], floor: int = BATCHNORM_FLOOR) -> dict[int, str]:
    """Index -> why that group cannot be recommended: over the device memory or below the BatchNorm floor."""
    refused = {}
    for index, group in enumerate(groups):
        if group.peak_gib > group.capacity_gib:
            refused[index] = f"peak {group.peak_gib:.3g} GiB is over the {group.capacity_gib:.3g} GiB capacity"
        elif group.device_batch < floor:
            refused[index] = f"{group.device_batch} images per device is below the BatchNorm floor of {floor}"
    return refused


def recommend(groups: list[Group], noise_scale: float, *, budget: bool = False,
              floor: int = BATCHNORM_FLOOR) -> Recommendation:
    """The batch that reaches the best mean mAP50-95 fastest: among the groups that fit memory and are at or above
    the BatchNorm floor, those within noise of the best mean, then the shortest run (with an equal wall-clock
    `budget`, the runs took the same time, so the best mean mAP). Says why, with the critical batch (B_simple)
    and the goodput next to it."""
    refused = refusals(groups, floor)
    eligible = [g for i, g in enumerate(groups) if i not in refused]
    refused_text = "; ".join(f"{groups[i].label}: {why}" for i, why in refused.items())
    if not eligible:
        return Recommendation(None, f"No batch recommended: {refused_text}.")
    best = max(eligible, key=lambda g: g.map_mean)
    if budget:
        pick, how = best, f"the best mean mAP50-95 within the same wall-clock budget ({best.run_s:.0f} s)"
    else:
        close = [g for g in eligible if best.map_mean - g.map_mean <= max(best.spread, g.spread)]
        pick = min(close, key=lambda g: (g.run_s, -g.map_mean))
        how = (f"the fastest ({pick.run_s:.0f} s a run) of the {len(close)} batch(es) within noise of the best "
               f"mean mAP50-95 {best.map_mean:.4f}")
    return Recommendation(pick, _why(pick, how, groups, eligible, noise_scale, floor)
                          + (f" Refused: {refused_text}." if refused else ""))


def _why(pick: Group, how: str, groups: list[Group], eligible: list[Group], noise_scale: float, floor: int) -> str:
    base = min(g.images_per_step for g in groups)
    if math.isnan(noise_scale):
        critical = "no noise scale was measured"
    else:
        side = "below" if pick.images_per_step <= noise_scale else "above"
        critical = (f"{pick.images_per_step} images per step is {side} the critical batch "
                    f"(B_simple {noise_scale:.0f})")
    by_goodput = max(eligible, key=lambda g: goodput(g.train_img_s, g.images_per_step, noise_scale, base))
    return (f"Recommended: {pick.label}, mean mAP50-95 {pick.map_mean:.4f} over {pick.seeds} seed(s): {how}. "
            f"It fits memory (peak {pick.peak_gib:.3g} of {pick.capacity_gib:.3g} GiB), {pick.device_batch} images "
            f"per device is at or above the BatchNorm floor of {floor}, and {critical}. Goodput "
            f"{goodput(pick.train_img_s, pick.images_per_step, noise_scale, base):.1f} images/s "
            f"(efficiency {efficiency(pick.images_per_step, noise_scale, base):.2f} against {base} images per "
            f"step); the highest goodput of the batches not refused is {by_goodput.label}.")


def summary_table(groups: list[Group], noise_scale: float) -> str:
    """One markdown row per (lr policy, batch asked): mAP50-95 over seeds, against the best, speed and goodput."""
    head = ("| lr policy | batch asked | batch | seeds | mAP50-95 mean | min-max | std | vs best | run s "
            "| train img/s | peak GiB | goodput img/s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base = min(g.images_per_step for g in groups)
    for group, note in zip(groups, versus_best(groups), strict=True):
        lines.append(
            f"| {group.policy} | {group.asked} | {group.batch} | {group.seeds} | {group.map_mean:.4f} "
            f"| {group.map_min:.4f}-{group.map_max:.4f} | {group.map_std:.4f} | {note} | {group.run_s:.1f} "
            f"| {group.train_img_s:.1f} | {group.peak_gib:.3g} "
            f"| {goodput(group.train_img_s, group.images_per_step, noise_scale, base):.1f} |")
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    """The benchmark rows as a markdown table, and the noise-scale hint under it."""
    head = ("| batch asked | seed | batch | device batch | decided by | lr policy | accumulate | images/step | lr0 "
            "| epochs | s/epoch | train img/s | step img/s | peak GiB | capacity GiB | optimizer steps | run s "
            "| mAP50-95 | mAP50 | B_simple |")
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
