"""GPU check of AutoBatch: is the chosen batch's real peak where it was aimed, without running out of memory?

    python benchmarks/autobatch_gpu.py [--scales n s] [--sizes 320 640] [--fractions 0.6 0.9] [--iterations 20]

For each (scale, imgsz, fraction): AutoBatch decides on the CUDA device (the same call training makes,
detector.train.plan.auto_batch, with 80 classes and 30 boxes per image), then 20 training iterations run at
the chosen batch on fresh copies of the model (forward, task-aligned loss, backward, clipping, optimizer,
EMA, AMP and channels_last as in training). Prints the measured peak reserved memory over those
iterations divided by fraction * capacity (goal: 0.90-1.03), the time spent deciding (goal: < 15 s) and
whether any out-of-memory error happened (goal: none), and the validation batch chosen from forward-only
samples. "decide s" covers both decisions. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from detector.autobatch.memory import is_out_of_memory
from detector.config import make_config
from detector.device import amp_dtype_for
from detector.model.loss import DetectionLoss
from detector.model.network import build_model
from detector.train.plan import auto_batch
from detector.train.probe import make_probe_step

CLASSES, BOXES = 80, 30


def check(scale: str, image_size: int, fraction: float, iterations: int, device: torch.device) -> dict:
    config = make_config({"model": scale, "imgsz": image_size, "batch": fraction, "device": str(device)})
    torch.manual_seed(0)
    model = build_model(scale, CLASSES).to(device)
    criterion = DetectionLoss(num_classes=CLASSES, strides=model.strides, reg_max=model.reg_max)
    torch.cuda.empty_cache()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        decision, val_decision = auto_batch(config, model, criterion, device=device, num_classes=CLASSES,
                                            max_boxes=BOXES, train_size=100_000, val_size=100_000,
                                            run_dir=Path(run_dir))
    seconds = time.perf_counter() - started
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    step = make_probe_step(model, criterion, image_size=image_size, max_boxes=BOXES, num_classes=CLASSES,
                           device=device, amp_dtype=amp_dtype_for(config.amp, device), channels_last=True,
                           optimizer_name="AdamW", seed=1)
    oom = ""
    try:
        for _ in range(iterations):
            step(decision.batch)
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        oom = str(err).splitlines()[0][:80]
    peak = torch.cuda.max_memory_reserved(device)
    del step
    torch.cuda.empty_cache()
    return {"scale": scale, "imgsz": image_size, "fraction": fraction, "batch": decision.batch,
            "decided_by": decision.decided_by, "ratio": peak / decision.budget_bytes, "seconds": seconds,
            "oom": oom or "no", "val_batch": val_decision.batch, "log": decision.log_line()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", nargs="+", default=["n", "s"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[320, 640])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.6, 0.9])
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this check needs a CUDA device")
    device = torch.device("cuda:0")
    print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    print("| scale | imgsz | fraction | batch | decided by | peak / target | decide s | OOM | val batch |")
    print("|---|---|---|---|---|---|---|---|---|")
    logs = []
    for scale in args.scales:
        for size in args.sizes:
            for fraction in args.fractions:
                row = check(scale, size, fraction, args.iterations, device)
                logs.append(row["log"])
                print(f"| {scale} | {size} | {fraction} | {row['batch']} | {row['decided_by']} | {row['ratio']:.3f} "
                      f"| {row['seconds']:.1f} | {row['oom']} | {row['val_batch']} |", flush=True)
    print("\n" + "\n".join(logs))


if __name__ == "__main__":
    main()
