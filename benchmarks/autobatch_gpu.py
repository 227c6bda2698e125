"""GPU acceptance run of AutoBatch, one PASS/FAIL line per row.

Does one real epoch at the chosen batch peak where it was aimed, without running out of memory, and is the
choice quick?

    python benchmarks/autobatch_gpu.py [--scales n s] [--sizes 320 640] [--fractions 0.6 0.9] [--repeat 8]
                                       [--shared both|process|self|none] [--no-torchrun]

Each row trains one epoch with mosaic through the trainer itself (Trainer with batch=<fraction>, epochs=1,
close_mosaic=0) on coco128 (data=coco128.yaml; $DETECTOR_DATASETS must hold it: the GPU machine is offline),
its 128 training images listed `--repeat` times so that the dataset size does not cap the choice (a
batch capped at the dataset size is not aimed at the target at all; such a row says "dataset size"). It reads:
  - peak / target: the most memory the caching allocator reserved during the training epoch
    (torch.cuda.max_memory_reserved, reset before fit() and read when validation starts) over AutoBatch's
    target, fraction x capacity (autobatch.json). Goal 0.90-1.03. Also the verified peak (AutoBatch's own three
    steps) over the target.
  - OOM: the out-of-memory events training recorded (oom_events.json in the run folder). Goal: none.
  - decide s: seconds of the training and validation decisions (autobatch.json). Goal < 15.
  - val batch: AutoBatch's validation batch, and the largest batch validation actually ran (a forward hook).
Shared rows run n at the first size and the last fraction with 40% of the GPU held: by another process ("other
process": a child that allocates it and waits, so mem_get_info sees it as taken) and by this process itself ("this
process": a tensor allocated here before the run, which the allocator counts as ours, so it is part of every
measured peak). With 2+ GPUs, a torchrun row trains n at the first size on two GPUs (device=0,1) and reads the
ranks' agreed batch from train.log; its peak is read from autobatch.json's first_epoch_peak_bytes when the trainer
records it, else not measured (the ranks are other processes). Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

RATIO_GOAL = (0.90, 1.03)
DECIDE_GOAL_S = 15.0
SHARED_SHARE = 0.4
HOLDERS = {"both": ["other process", "this process"], "process": ["other process"], "self": ["this process"],
           "none": []}


def repeated_card(folder: Path, repeat: int) -> Path:
    """A data card: coco128's training images listed `repeat` times (new image ids), its validation as is."""
    from detector.data.cards import load_data_card

    card = load_data_card("coco128.yaml")
    data = json.loads(card.train_json.read_text(encoding="utf-8"))
    images, annotations, offset = [], [], max(image["id"] for image in data["images"]) + 1
    for copy in range(repeat):
        images += [{**image, "id": image["id"] + copy * offset} for image in data["images"]]
        annotations += [{**a, "id": a["id"] + copy * 10**9, "image_id": a["image_id"] + copy * offset}
                        for a in data["annotations"]]
    train_json = folder / "instances_train_repeated.json"
    train_json.write_text(json.dumps({**data, "images": images, "annotations": annotations}), encoding="utf-8")
    path = folder / "coco128_repeated.yaml"
    path.write_text(json.dumps({"path": str(card.root), "train": str(card.train_images), "val": str(card.val_images),
                                "train_json": str(train_json), "val_json": str(card.val_json),
                                "names": card.names}), encoding="utf-8")
    return path


@contextlib.contextmanager
def memory_held(where: str, device: torch.device) -> Iterator[None]:
    """SHARED_SHARE of the GPU held for the block: by a child process ("other process") or here ("this process")."""
    size = int(SHARED_SHARE * torch.cuda.mem_get_info(device)[1])
    if where == "this process":
        hold = torch.empty(size, dtype=torch.uint8, device=device)
        try:
            yield
        finally:
            del hold
            torch.cuda.empty_cache()
        return
    code = ("import sys, torch; x = torch.empty(int(sys.argv[1]), dtype=torch.uint8, device=sys.argv[2]); "
            "print('held', flush=True); sys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", code, str(size), str(device)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        if child.stdout.readline().strip() != "held":
            raise RuntimeError("the process meant to hold GPU memory did not start")
        yield
    finally:
        child.stdin.close()
        child.wait(timeout=60)


def train_row(card: Path, run_dir: Path, device: torch.device, *, scale: str, size: int, fraction: float) -> dict:
    """One epoch through the trainer at AutoBatch's choice, in a fresh `run_dir`; what it measured and recorded."""
    from detector.model.network import Detector
    from detector.train.trainer import Trainer

    overrides = {"data": str(card), "model": scale, "imgsz": size, "batch": fraction, "epochs": 1, "close_mosaic": 0,
                 "plots": False, "device": str(device), "project": str(run_dir.parent), "name": run_dir.name}
    trainer = Trainer(overrides, progress=False)  # AutoBatch's log lines reach the console ...
    for handler in logging.getLogger("detector").handlers:  # ... the validation tables only train.log
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
    seen = {"train_peak": None, "val_batches": []}
    evaluate = trainer.evaluate

    def evaluate_after_training(loader, final=False):
        if seen["train_peak"] is None:
            seen["train_peak"] = torch.cuda.max_memory_reserved(device)
        return evaluate(loader, final)

    def count_validation_batch(module, args):
        if isinstance(module, Detector) and not module.training and seen["train_peak"] is not None:
            seen["val_batches"].append(len(args[0]))

    trainer.evaluate = evaluate_after_training
    hook = torch.nn.modules.module.register_module_forward_pre_hook(count_validation_batch)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        trainer.fit()
    finally:
        hook.remove()
    run_dir = trainer.run_dir
    del trainer
    gc.collect()
    torch.cuda.empty_cache()
    return {**read_run(run_dir), "epoch_peak": seen["train_peak"], "val_run": max(seen["val_batches"], default=0)}


def read_run(run_dir: Path) -> dict:
    """What a run folder records: AutoBatch's decisions, its out-of-memory events, the DDP agreement line."""
    saved = json.loads((run_dir / "autobatch.json").read_text(encoding="utf-8"))
    oom = run_dir / "oom_events.json"
    log = (run_dir / "train.log").read_text(encoding="utf-8") if (run_dir / "train.log").is_file() else ""
    agreed = re.search(r"AutoBatch under DDP: per-rank choices (\[[^\]]*\]) -> (\d+)", log)
    return {"train": saved["train"], "val": saved["val"],
            "oom_events": json.loads(oom.read_text(encoding="utf-8")) if oom.is_file() else [],
            "agreed": f"{agreed.group(1)} -> {agreed.group(2)}" if agreed else None,
            "epoch_peak": saved["train"].get("first_epoch_peak_bytes")}


def verdict(row: dict) -> tuple[str, list[str]]:
    """PASS or FAIL, and the goals the row missed."""
    train, missed = row["train"], []
    capped = train["decided_by"] == "dataset size"
    if row["epoch_peak"] is not None:
        ratio = row["epoch_peak"] / train["budget_bytes"]
        if ratio > RATIO_GOAL[1] or (ratio < RATIO_GOAL[0] and not capped):
            missed.append(f"peak/target {ratio:.3f} outside {RATIO_GOAL[0]}-{RATIO_GOAL[1]}")
    if row["oom_events"]:
        missed.append(f"{len(row['oom_events'])} out-of-memory event(s)")
    if train["seconds"] + row["val"]["seconds"] >= DECIDE_GOAL_S:
        missed.append(f"deciding took {train['seconds'] + row['val']['seconds']:.1f} s")
    if row.get("val_run", 0) > row["val"]["batch"]:
        missed.append(f"validation ran {row['val_run']} > its batch {row['val']['batch']}")
    return ("FAIL" if missed else "PASS"), missed


def print_row(label: str, row: dict) -> bool:
    train = row["train"]
    peak = "not measured" if row["epoch_peak"] is None else f"{row['epoch_peak'] / train['budget_bytes']:.3f}"
    verified = train["verified_peak_bytes"] / train["budget_bytes"] if train["verified_peak_bytes"] else float("nan")
    status, missed = verdict(row)
    print(f"| {label} | {train['batch']} | {train['decided_by']} | {peak} | {verified:.3f} | {len(row['oom_events'])} "
          f"| {train['seconds'] + row['val']['seconds']:.1f} | {row['val']['batch']} / {row.get('val_run', '-')} "
          f"| {row.get('agreed') or '-'} | {status}{': ' + '; '.join(missed) if missed else ''} |", flush=True)
    return status == "PASS"


def torchrun_row(card: Path, run_dir: Path, *, size: int, fraction: float) -> dict:
    from detector.train.trainer import train

    train({"data": str(card), "model": "n", "imgsz": size, "batch": fraction, "epochs": 1, "close_mosaic": 0,
           "plots": False, "device": "0,1", "project": str(run_dir.parent), "name": run_dir.name}, progress=False)
    return read_run(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--scales", nargs="+", default=["n", "s"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[320, 640])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.6, 0.9])
    parser.add_argument("--repeat", type=int, default=8, help="times coco128's training images are listed")
    parser.add_argument("--shared", choices=list(HOLDERS), default="both",
                        help="who holds 40%% of the GPU in the shared rows: another process, this one, both or none")
    parser.add_argument("--no-torchrun", action="store_true", help="skip the two-GPU row")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this acceptance run needs a CUDA device")
    from detector.runs import setup_logging

    setup_logging()
    device, started, results = torch.device("cuda:0"), time.perf_counter(), []
    print(f"device: {torch.cuda.get_device_name(device)}, {torch.cuda.mem_get_info(device)[1] / 2**30:.1f} GiB, "
          f"torch {torch.__version__}; coco128 x {args.repeat} training images")
    print("| row | batch | decided by | epoch peak / target | verified / target | OOM | decide s | val batch / run "
          "| DDP agreed | result |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        root, card = Path(folder), repeated_card(Path(folder), args.repeat)
        rows = [(f"{s} {size} {f}", None, s, size, f) for s in args.scales for size in args.sizes
                for f in args.fractions]
        holders = HOLDERS[args.shared]
        rows += [(f"n {args.sizes[0]} {args.fractions[-1]}, 40% held by {who}", who, "n", args.sizes[0],
                  args.fractions[-1]) for who in holders]
        for number, (label, holder, scale, size, fraction) in enumerate(rows):
            run_dir = root / f"row{number}"  # a folder of its own: a saved autobatch.json would be reused
            try:
                if holder == "torchrun":
                    row = torchrun_row(card, run_dir, size=size, fraction=fraction)
                else:
                    with memory_held(holder, device) if holder else contextlib.nullcontext():
                        row = train_row(card, run_dir, device, scale=scale, size=size, fraction=fraction)
                results.append(print_row(label, row))
            except Exception as err:  # a row that crashes is a FAIL; the next rows still run
                print(f"| {label} | | | | | | | | | FAIL: {type(err).__name__}: {str(err)[:300]} |", flush=True)
                results.append(False)
        if torch.cuda.device_count() >= 2 and not args.no_torchrun:
            rows.append((f"n {args.sizes[0]} {args.fractions[-1]}, torchrun on 2 GPUs", "torchrun", "n",
                         args.sizes[0], args.fractions[-1]))
    print(f"{sum(results)}/{len(results)} rows PASS in {(time.perf_counter() - started) / 60:.1f} min")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
