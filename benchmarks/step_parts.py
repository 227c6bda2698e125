"""Where one training step's time goes: NCHW against channels_last, malloc's default against kept freed memory,
and what loading costs per image.

    python benchmarks/step_parts.py [--data coco128.yaml] [--imgsz 320] [--batches 4] [--repeats 5] [--threads 2]

The nano model trains on real mosaic batches of 16 (loaded first, kept in memory). Each repeat times every
stored batch through prepare (uint8 -> float), forward, loss, backward, optimizer (clip + fused AdamW)
and EMA, once with the model and inputs in NCHW and once in channels_last (NHWC), alternating so that a busy
spell on the machine hits both. That runs in two fresh processes, one with glibc malloc's defaults and one
after runs.keep_freed_memory() (what training does), since the setting cannot be undone in a process.
Prints the median milliseconds per batch of each part, the images/s of their sum, and the page faults and
system (kernel) CPU time per step. Then the loader's cost per image (decode + mosaic + augmentation, one
thread) with the images read from disk and from the RAM cache (cache=true or auto).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import cv2
import torch

from detector.data.cards import load_data_card
from detector.data.coco import CocoDataset
from detector.data.loader import DetectionDataset, build_dataloader, set_epoch
from detector.device import keep_freed_memory, prepare_images
from detector.model.loss import DetectionLoss
from detector.model.network import build_model
from detector.train.optim import ModelEMA, build_optimizer

PARTS = ("prepare", "forward", "loss", "backward", "optimizer", "ema")


def time_parts(setup: dict, batches: list, channels_last: bool) -> dict[str, float]:
    """Seconds of each part, summed over `batches`."""
    model, criterion, optimizer, ema = setup["model"], setup["criterion"], setup["optimizer"], setup["ema"]
    spent = dict.fromkeys(PARTS, 0.0)
    for batch in batches:
        marks = [time.perf_counter()]
        images = prepare_images(batch.images, torch.device("cpu"), channels_last)
        marks.append(time.perf_counter())
        outputs = model(images)
        marks.append(time.perf_counter())
        loss, _ = criterion(outputs, batch.targets, len(images))
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        ema.update(model)
        marks.append(time.perf_counter())
        for part, begin, end in zip(PARTS, marks[:-1], marks[1:], strict=True):
            spent[part] += end - begin
    return spent


def make_setup(num_classes: int, channels_last: bool) -> dict:
    torch.manual_seed(0)
    model = build_model("n", num_classes).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return {"model": model, "criterion": DetectionLoss(num_classes=num_classes, strides=model.strides,
                                                       reg_max=model.reg_max),
            "optimizer": build_optimizer(model, name="AdamW", lr=1e-3, momentum=0.937, weight_decay=5e-4),
            "ema": ModelEMA(model)}


def loading_ms_per_image(dataset: CocoDataset, image_size: int, count: int) -> float:
    wrapped = DetectionDataset(dataset, train=True, image_size=image_size, seed=0)
    wrapped.set_epoch(0)
    for index in range(min(8, len(dataset))):  # warm-up
        wrapped[index]
    start = time.perf_counter()
    for index in range(count):
        wrapped[index % len(dataset)]
    return (time.perf_counter() - start) / count * 1000


def measure(args: argparse.Namespace) -> dict:
    """In this process: median seconds per batch of each part, per layout, and page faults per step."""
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(1)  # as in a loader worker
    card = load_data_card(args.data)
    dataset = CocoDataset(card.train_images, card.train_json)
    loader = build_dataloader(dataset, train=True, image_size=args.imgsz, batch_size=16, workers=0)
    set_epoch(loader, 0)
    batches = [batch for _, batch in zip(range(args.batches), loader, strict=False)]
    setups = {layout: make_setup(len(dataset.names), layout == "channels_last") for layout in ("NCHW", "channels_last")}
    for layout, setup in setups.items():  # warm-up: oneDNN kernels, optimizer state
        time_parts(setup, batches[:1], layout == "channels_last")
    seconds: dict[str, dict[str, list[float]]] = {layout: {p: [] for p in PARTS} for layout in setups}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(args.repeats):
        for layout, setup in setups.items():
            for part, value in time_parts(setup, batches, layout == "channels_last").items():
                seconds[layout][part].append(value / len(batches))
    steps, after = args.repeats * 2 * len(batches), resource.getrusage(resource.RUSAGE_SELF)
    return {"parts": {layout: {p: statistics.median(v) for p, v in parts.items()} for layout, parts in seconds.items()},
            "faults_per_step": (after.ru_minflt - usage.ru_minflt) / steps,
            "system_ms_per_step": (after.ru_stime - usage.ru_stime) * 1000 / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="coco128.yaml")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batches", type=int, default=4, help="stored batches timed per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=["default", "kept"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child == "kept":
            keep_freed_memory()
        print(json.dumps(measure(args)))
        return
    print(f"{args.data} imgsz {args.imgsz}, batch 16, {args.threads} threads, torch {torch.__version__}; "
          f"median ms per batch over {args.repeats} x {args.batches} batches")
    print("| malloc | layout | " + " | ".join(PARTS)
          + " | step | images/s | page faults per step | system CPU ms per step |")
    print("|---|---|" + "---:|" * (len(PARTS) + 4))
    for malloc in ("default", "kept"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", malloc], capture_output=True,
                             text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        for layout, parts in result["parts"].items():
            medians = [parts[p] * 1000 for p in PARTS]
            print(f"| {malloc} | {layout} | " + " | ".join(f"{m:.0f}" for m in medians)
                  + f" | {sum(medians):.0f} | {16000 / sum(medians):.2f} | {result['faults_per_step']:.0f} "
                  f"| {result['system_ms_per_step']:.0f} |",
                  flush=True)
    cv2.setNumThreads(1)
    card = load_data_card(args.data)
    dataset = CocoDataset(card.train_images, card.train_json)
    count = 4 * len(dataset)
    from_disk = loading_ms_per_image(dataset, args.imgsz, count)
    cached = loading_ms_per_image(CocoDataset(card.train_images, card.train_json, cache=True, image_size=args.imgsz),
                                  args.imgsz, count)
    print(f"loading (decode + mosaic + augmentation, one thread): {from_disk:.1f} ms per image from disk, "
          f"{cached:.1f} ms from the RAM cache")


if __name__ == "__main__":
    main()
