"""Where the time of the real training loop goes: torch.profiler over a few batches of real data.

    python benchmarks/profile_train.py [--data coco128.yaml] [--imgsz 320] [--batches 6] [--workers 0]
        [--threads 2] [--channels-last] [--cache] [--top 25] [--sort self_cpu_time_total]

Trains the nano model (engine.train_step, as training runs it) on batches of 16 after 2 warm-up batches.
With --workers 0 the loading and augmentation run in this process, so they show in the profile as the
`data` region; the step is split into `forward`, `loss`, `backward` and `optimizer+ema` regions. Prints
the CPU time of each region (process CPU time, which a busy machine disturbs far less than wall time;
with --threads 1 it is the work done), then the top ops by self CPU time (the profiler's wall time).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from detector.data.cards import load_data_card
from detector.data.coco import CocoDataset
from detector.data.loader import build_dataloader, set_epoch
from detector.device import set_threads
from detector.model.loss import DetectionLoss
from detector.model.network import build_model
from detector.train import engine
from detector.train.optim import ModelEMA, Schedule, build_optimizer

REGIONS = ("data", "forward", "loss", "backward", "optimizer+ema")


CPU_SECONDS: dict[str, float] = {}  # process CPU time per region (all threads), less disturbed by a busy machine


def labelled(name: str, function):
    """`function` run inside a profiler region called `name`, its CPU time added to CPU_SECONDS[name]."""
    def wrapper(*args, **kwargs):
        start = time.process_time()
        with record_function(name):
            result = function(*args, **kwargs)
        CPU_SECONDS[name] = CPU_SECONDS.get(name, 0.0) + time.process_time() - start
        return result
    return wrapper


def build_context(num_classes: int, iters_per_epoch: int, channels_last: bool) -> engine.StepContext:
    torch.manual_seed(0)
    model = build_model("n", num_classes)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    criterion = DetectionLoss(num_classes=num_classes, strides=model.strides, reg_max=model.reg_max)
    schedule = Schedule(lr0=0.002, lrf=0.01, epochs=1, iters_per_epoch=iters_per_epoch, warmup_iters=0,
                        warmup_bias_lr=0.0, warmup_momentum=0.8, momentum=0.937, accumulate=1)
    return engine.StepContext(model=model, criterion=labelled("loss", criterion),
                              optimizer=build_optimizer(model, name="AdamW", lr=0.002, momentum=0.937,
                                                        weight_decay=5e-4),
                              schedule=schedule, scaler=torch.amp.GradScaler("cpu", enabled=False),
                              ema=ModelEMA(model), device=torch.device("cpu"), channels_last=channels_last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="coco128.yaml")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", action="store_true", help="decode the images once, into RAM (as cache=auto does "
                        "for a set this small)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC model and inputs, as training does")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--sort", default="self_cpu_time_total")
    args = parser.parse_args()
    set_threads(args.threads)  # as training sets them (and, where the code has it, its host memory setting)
    card = load_data_card(args.data)
    dataset = CocoDataset(card.train_images, card.train_json, cache=args.cache, image_size=args.imgsz)
    loader = build_dataloader(dataset, train=True, image_size=args.imgsz, batch_size=16, workers=args.workers)
    set_epoch(loader, 0)
    ctx = build_context(len(dataset.names), len(loader), args.channels_last)
    forward = ctx.model.forward
    ctx.model.forward = labelled("forward", forward)
    # Region labels for the parts of engine.train_step; restored afterwards.
    originals = {name: getattr(engine, name) for name in ("optimizer_step",)}
    engine.optimizer_step = labelled("optimizer+ema", originals["optimizer_step"])
    original_backward = torch.Tensor.backward
    torch.Tensor.backward = labelled("backward", original_backward)
    batches = iter(loader)
    for _ in range(2):  # warm-up: oneDNN kernels, optimizer state
        batch = next(batches)
        engine.train_step(ctx, batch.images, batch.targets)
    images = 0
    CPU_SECONDS.clear()
    next_batch = labelled("data", lambda: next(batches))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(args.batches):
            batch = next_batch()
            engine.train_step(ctx, batch.images, batch.targets)
            images += len(batch)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    torch.Tensor.backward = original_backward
    engine.optimizer_step = originals["optimizer_step"]
    print(f"{args.data} imgsz {args.imgsz} batch 16, {args.threads} threads, workers {args.workers}: "
          f"{images / seconds:.2f} images/s under the profiler, {1000 * cpu_seconds / images:.1f} ms CPU per image")
    print("| region | CPU ms per image | share of the loop's CPU time |\n|---|---:|---:|")
    for region in REGIONS:
        print(f"| {region} | {1000 * CPU_SECONDS.get(region, 0.0) / images:.1f} "
              f"| {100 * CPU_SECONDS.get(region, 0.0) / cpu_seconds:.1f}% |")
    print(f"| other (step bookkeeping, schedule) | "
          f"{1000 * (cpu_seconds - sum(CPU_SECONDS.values())) / images:.1f} | "
          f"{100 * (1 - sum(CPU_SECONDS.values()) / cpu_seconds):.1f}% |")
    print()
    print(prof.key_averages().table(sort_by=args.sort, row_limit=args.top, max_name_column_width=40))


if __name__ == "__main__":
    main()
