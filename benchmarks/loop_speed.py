"""Images per second of the real training loop (loading, augmentation, step) for thread/worker choices.

    python benchmarks/loop_speed.py --data /tmp/shapes-ref/shapes.yaml --imgsz 256 [--pairs 2,0 2,1 2,2 1,1]
        [--batches 12] [--repeats 3]

Torch's intra-op threads and the loader's worker processes share the machine's cores. For each
(threads, workers) pair this trains the nano model for `--batches` batches of 16 (after 3 warm-up
batches, the workers already running) and prints the median images/s over `--repeats` runs, each in a
fresh process so that thread pools do not carry over. Mosaic and the other augmentations are on, as
in training.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def measure(data: str, image_size: int, threads: int, workers: int, batches: int) -> float:
    """One run in this process: images/s over `batches` batches after 3 warm-up ones."""
    import torch

    from detector.data.cards import load_data_card
    from detector.data.coco import CocoDataset
    from detector.data.loader import build_dataloader, set_epoch
    from detector.engine import StepContext, train_step
    from detector.loss import DetectionLoss
    from detector.model import build_model
    from detector.optim import ModelEMA, Schedule, build_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    card = load_data_card(data)
    dataset = CocoDataset(card.train_images, card.train_json)
    loader = build_dataloader(dataset, train=True, image_size=image_size, batch_size=16, workers=workers)
    set_epoch(loader, 0)
    model = build_model("n", len(dataset.names))
    schedule = Schedule(lr0=0.002, lrf=0.01, epochs=1, iters_per_epoch=len(loader), warmup_iters=0,
                        warmup_bias_lr=0.0, warmup_momentum=0.8, momentum=0.937, accumulate=1)
    ctx = StepContext(model=model, criterion=DetectionLoss(num_classes=len(dataset.names), strides=model.strides,
                                                           reg_max=model.reg_max),
                      optimizer=build_optimizer(model, name="AdamW", lr=0.002, momentum=0.937, weight_decay=5e-4),
                      schedule=schedule, scaler=torch.amp.GradScaler("cpu", enabled=False), ema=ModelEMA(model),
                      device=torch.device("cpu"))
    images, start = 0, None
    for index, batch in enumerate(loader):
        if index == 3:
            start = time.perf_counter()
        train_step(ctx, batch.images, batch.targets)
        if start is not None:
            images += len(batch)
        if index == 3 + batches - 1:
            break
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--imgsz", type=int, default=256)
    parser.add_argument("--pairs", nargs="+", default=["2,0", "2,1", "2,2", "1,1"], help="threads,workers")
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: a single run in a child process
    args = parser.parse_args()
    if args.one:
        threads, workers = (int(v) for v in args.one.split(","))
        print(json.dumps(measure(args.data, args.imgsz, threads, workers, args.batches)))
        return
    print(f"training loop images/s, nano, batch 16, imgsz {args.imgsz}, {args.data}; median of {args.repeats}")
    print(f"{'threads':>7} {'workers':>7} {'img/s':>7}   runs")
    for pair in args.pairs:
        rates = []
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, __file__, "--data", args.data, "--imgsz", str(args.imgsz),
                                  "--batches", str(args.batches), "--one", pair], capture_output=True, text=True,
                                 check=True)
            rates.append(json.loads(out.stdout.strip().splitlines()[-1]))
        threads, workers = pair.split(",")
        print(f"{threads:>7} {workers:>7} {statistics.median(rates):>7.1f}   "
              + " ".join(f"{r:.1f}" for r in rates), flush=True)


if __name__ == "__main__":
    main()
