"""A run's history, one row per epoch: results.csv (and results.png), oom_events.json."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from detector.atomic import atomic_write_text
from detector.evaluate.metrics import DetectionMetrics
from detector.evaluate.plots import plot_results


def epoch_row(epoch: int, losses: dict[str, float], metrics: DetectionMetrics | None, *, train_time: float,
              epoch_time: float, lr: float, optimizer_steps: int) -> dict[str, float | str]:
    """results.csv's row of `epoch` (0-based); an epoch without validation leaves its metric cells blank."""
    measured = metrics.as_row() if metrics is not None else dict.fromkeys(DetectionMetrics().as_row(), "")
    return {"epoch": epoch + 1, "time": round(epoch_time, 2), "train_time": round(train_time, 2),
            **{k: round(v, 5) for k, v in losses.items()},
            **{k: v if v == "" else round(v, 5) for k, v in measured.items()},
            "lr": round(lr, 7), "optimizer_steps": optimizer_steps}


def write_history(run_dir: Path, rows: list[dict], *, oom_events: list[dict], plots: bool) -> None:
    """Rewrite results.csv atomically from every row, oom_events.json when there are any, and with plots
    results.png."""
    buffer = io.StringIO()
    # An epoch whose every batch was skipped (non-finite losses) has no loss columns: they stay blank.
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run_dir / "results.csv", buffer.getvalue())
    if oom_events:
        atomic_write_text(run_dir / "oom_events.json", json.dumps(oom_events, indent=1))
    if plots:
        plot_results(run_dir / "results.csv", run_dir / "results.png")
