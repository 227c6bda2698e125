"""Images per second of one training step (forward, loss, backward, optimizer step, EMA) on random data.

    python benchmarks/train_step_speed.py [--scale n] [--sizes 320 640] [--batches 1 2 4 8 16] [--repeats 5]

The step is the one training runs (train/engine.whole_step via train/probe.make_probe_step): the real model,
task-aligned loss on `--boxes` boxes per image, SGD and EMA. No data loading: this is the ceiling a
training loop can reach. Prints the median of `--repeats` timed steps after two warm-up steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from detector.model.loss import DetectionLoss
from detector.model.network import build_model
from detector.train.probe import make_probe_step


def images_per_second(step, batch: int, repeats: int) -> float:
    for _ in range(2):  # warm-up: optimizer state, allocator, oneDNN kernels
        step(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="n")
    parser.add_argument("--sizes", type=int, nargs="+", default=[320, 640])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--boxes", type=int, default=8, help="boxes per image")
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.scale, args.classes)
    criterion = DetectionLoss(num_classes=args.classes, strides=model.strides, reg_max=model.reg_max)
    print(f"scale {args.scale}, {args.classes} classes, {args.boxes} boxes/image, {args.threads} threads, "
          f"torch {torch.__version__}; images/s of forward+loss+backward+SGD+EMA")
    print(f"{'imgsz':>6} " + " ".join(f"{'b=' + str(b):>7}" for b in args.batches))
    for size in args.sizes:
        step = make_probe_step(model, criterion, image_size=size, max_boxes=args.boxes, num_classes=args.classes,
                               device="cpu")
        rates = [images_per_second(step, batch, args.repeats) for batch in args.batches]
        print(f"{size:>6} " + " ".join(f"{rate:>7.1f}" for rate in rates))


if __name__ == "__main__":
    main()
