"""Our training loop against our pure training step, for thread / worker / cache choices, paired batch by batch.

    python benchmarks/loop_speed.py [--data coco128.yaml] [--imgsz 320]
        [--variants workers=1 workers=0 "workers=1 cache=false" ...] [--batches 12] [--repeats 3]

Torch's intra-op threads and the loader's worker processes share the machine's cores, so loading costs
the training step time even when it runs in a worker. A variant is training settings (KEY=VALUE, as on
the command line, space-separated) on top of the defaults; each run is a fresh process that builds the
nano model at batch 16 as training does and measures paired_rates: every batch the loader gives is
trained on (the loop, waiting for the batch included) and then trained on again (the pure step). Runs
are interleaved across variants (A, B, A, B, ...), so a slow spell of the machine hits each; the table
gives medians over `--repeats` runs, with the time the loop waited for each batch (loading in the main
process, or receiving it from a worker).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time


def paired_rates(run, *, mosaic: bool, first_epoch: int, batches: int = 12) -> tuple[float, float, float]:
    """Our train loop and our pure step side by side: images/s of each over the same `batches` batches, and
    the median milliseconds the loop waited for the loader to hand it a batch.

    The run's own loader (its workers) goes through epochs from `first_epoch` on. Each batch it gives is
    trained on (the loop: from the previous step's end, waiting for the batch included) and then trained
    on once more (the pure step: the batch is in memory, and the worker has already refilled its queue).
    Pairing them batch by batch cancels this machine's drift in speed, which separate measurements did not.
    The first batch (the workers starting, the kernels warming up) is left out.
    """
    import torch

    from detector.data.loader import set_epoch
    from detector.train.engine import train_step

    def now() -> float:
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)  # the steps are queued: time them when they are done
        return time.perf_counter()

    loader = run.loader(True, mosaic=mosaic)
    loop = pure = 0.0
    images = seen = 0
    waits = []
    epoch, end = first_epoch, now()
    while seen <= batches:
        set_epoch(loader, epoch)
        epoch += 1
        for batch in loader:
            arrived = now()
            train_step(run.ctx, batch.images, batch.targets)
            middle = now()
            train_step(run.ctx, batch.images, batch.targets)
            start, end = end, now()
            if seen:
                loop, pure, images = loop + middle - start, pure + end - middle, images + len(batch)
                waits.append(1e3 * (arrived - start))
            seen += 1
            if seen > batches:
                break
    return images / loop, images / pure, statistics.median(waits)


def measure(data: str, image_size: int, variant: str, batches: int) -> dict:
    """One run in this process: the loop and pure rates of `variant`'s settings, and its threads/workers."""
    import torch

    from detector.train.trainer import Trainer

    overrides = dict(item.split("=", 1) for item in variant.split())
    with tempfile.TemporaryDirectory() as project:
        run = Trainer({"data": data, "model": "n", "imgsz": image_size, "batch": 16, "epochs": 1, "val": False,
                       "plots": False, "project": project, "name": "loop", **overrides}, progress=False)
        loop, pure, wait_ms = paired_rates(run, mosaic=True, first_epoch=0, batches=batches)
        workers = run.loader(True).num_workers
    return {"loop": loop, "pure": pure, "wait_ms": wait_ms, "threads": torch.get_num_threads(), "workers": workers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="coco128.yaml")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--variants", nargs="+", default=["workers=1", "workers=0", "workers=2"],
                        help='training settings of each variant, e.g. "workers=1 cache=false"')
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: a single run in a child process
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.data, args.imgsz, args.one, args.batches)))
        return
    results: dict[str, list[dict]] = {variant: [] for variant in args.variants}
    for _ in range(args.repeats):
        for variant in args.variants:
            out = subprocess.run([sys.executable, __file__, "--data", args.data, "--imgsz", str(args.imgsz),
                                  "--batches", str(args.batches), "--one", variant], capture_output=True, text=True,
                                 check=True)
            results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"nano, batch 16, imgsz {args.imgsz}, {args.data}; {args.batches} paired batches per run, "
          f"medians of {args.repeats} runs")
    print("| settings | threads / workers | loop img/s | pure img/s | batch wait ms | loop/pure | loop/pure per run |")
    print("|---|---|---:|---:|---:|---:|---|")
    for variant, runs in results.items():
        ratios = [r["loop"] / r["pure"] for r in runs]
        print(f"| {variant or 'defaults'} | {runs[0]['threads']} / {runs[0]['workers']} "
              f"| {statistics.median(r['loop'] for r in runs):.2f} | {statistics.median(r['pure'] for r in runs):.2f} "
              f"| {statistics.median(r['wait_ms'] for r in runs):.1f} | {statistics.median(ratios):.3f} "
              f"| {' '.join(f'{r:.3f}' for r in ratios)} |", flush=True)


if __name__ == "__main__":
    main()
