"""Latency and throughput of inference (forward, decode, NMS) by batch size: PyTorch with Conv+BN fused (what
predict and val run), unfused, and the exported ONNX model on onnxruntime when it is installed.

    python benchmarks/inference_speed.py [--model n] [--sizes 320 640] [--batches 1 8 32 -1] [--repeats 5]
                                         [--device cpu|cuda:0]

Inputs are coco8's val images ($DETECTOR_DATASETS/coco8, else random pictures), letterboxed and repeated to
fill the batch. batch -1 is AutoBatch's inference choice (detector.inference.predict.inference_batch, 60% of memory;
on CPU it also weighs images/s). Each repeat times every variant once, one after another, so that a load
that changes during the run slows all of them alike; the table holds medians of the repeats, after one
warm-up run of each. Preparing images is not timed (predict does it in a reading thread, beside the model).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from detector.data.augment import letterbox, round_image_size
from detector.inference.export import OnnxForward, export_onnx
from detector.inference.predict import TorchForward, inference_batch
from detector.inference.sources import open_source
from detector.model.network import build_model
from detector.model.postprocess import non_max_suppression


def pictures(image_size: int) -> np.ndarray:
    """uint8 (N, 3, S, S) RGB: coco8's val images letterboxed, or 4 random pictures without the datasets."""
    val = Path(os.environ.get("DETECTOR_DATASETS", "datasets")) / "coco8" / "images" / "val"
    if val.is_dir():
        images = [letterbox(f.image[..., ::-1], np.zeros((0, 4), np.float32), image_size)[0] for f in open_source(val)]
    else:
        images = list(np.random.default_rng(0).integers(0, 256, (4, image_size, image_size, 3), dtype=np.uint8))
    return np.stack(images).transpose(0, 3, 1, 2)


def timed(forward: Callable, images: torch.Tensor, conf: float, device: torch.device) -> float:
    """Seconds of one batch: copy to the device, forward (with decoding), then NMS as predict runs it."""
    started = time.perf_counter()
    boxes, scores = forward(images)
    non_max_suppression(boxes, scores, conf=conf)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def variants(model: torch.nn.Module, image_size: int, folder: Path, device: torch.device) -> dict[str, Callable]:
    """The forwards to time: fused and unfused PyTorch, and onnxruntime (CPU only) on the exported file if
    onnx and onnxruntime are installed."""
    found = {"fused": TorchForward(model.fused_copy(), device),
             "unfused": TorchForward(copy.deepcopy(model), device)}
    if device.type == "cpu" and importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxruntime"):
        path = export_onnx(model, folder / f"model{image_size}.onnx", image_size=image_size,
                           names=[str(c) for c in range(model.num_classes)],
                           category_ids=list(range(1, model.num_classes + 1)))
        found["onnxruntime"] = OnnxForward(path)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="n", help="a scale (n, s, m) or a model YAML")
    parser.add_argument("--sizes", type=int, nargs="+", default=[320, 640])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, -1])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--conf", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model, 80).eval()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPUs"
    print(f"scale {args.model}, 80 classes, {args.threads} torch threads, torch {torch.__version__}, {where}; "
          f"medians of {args.repeats} repeats")
    print("| imgsz | batch | fused ms/batch | fused img/s | unfused img/s | fused / unfused | onnxruntime img/s "
          "| onnxruntime / fused |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    notes = []
    with tempfile.TemporaryDirectory() as folder:
        for size in (round_image_size(s) for s in args.sizes):
            forwards = variants(model, size, Path(folder), device)
            pool = torch.from_numpy(pictures(size))
            for batch in args.batches:
                label = str(batch)
                if batch == -1:
                    decision = inference_batch(forwards["fused"].model, image_size=size, device=device,
                                               fraction=0.6, max_batch=1024 if device.type == "cuda" else 256,
                                               conf=args.conf)
                    batch, label = decision.batch, f"-1 -> {decision.batch}"
                    notes.append(decision.log_line())
                images = pool[torch.arange(batch) % len(pool)]
                seconds = {name: [] for name in forwards}
                for repeat in range(args.repeats + 1):  # the first is a warm-up
                    for name, forward in forwards.items():
                        elapsed = timed(forward, images, args.conf, device)
                        if repeat:
                            seconds[name].append(elapsed)
                median = {name: statistics.median(values) for name, values in seconds.items()}
                rate = {name: batch / value for name, value in median.items()}
                ort = (f"{rate['onnxruntime']:.1f} | {rate['onnxruntime'] / rate['fused']:.2f}"
                       if "onnxruntime" in rate else "- | -")
                print(f"| {size} | {label} | {1000 * median['fused']:.0f} | {rate['fused']:.1f} | "
                      f"{rate['unfused']:.1f} | {rate['fused'] / rate['unfused']:.2f} | {ort} |", flush=True)
    print("\n".join(notes))


if __name__ == "__main__":
    main()
