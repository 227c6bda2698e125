"""Print a run's results.csv as a markdown table of mAP against cumulative wall time.

    python benchmarks/curve_table.py runs/detect/train/results.csv

Wall time is the sum of the per-epoch `time` column (training and validation, not start-up).
"""

from __future__ import annotations

import csv
import sys


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    rows = list(csv.DictReader(open(sys.argv[1], newline="")))
    print("| epoch | wall time (min) | mAP50-95 | mAP50 |")
    print("|---:|---:|---:|---:|")
    elapsed = 0.0
    for row in rows:
        elapsed += float(row["time"])
        map50_95, map50 = row["metrics/mAP50-95"] or "-", row["metrics/mAP50"] or "-"
        print(f"| {row['epoch']} | {elapsed / 60:.1f} | {map50_95} | {map50} |")


if __name__ == "__main__":
    main()
