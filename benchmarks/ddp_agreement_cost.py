"""Cost per training step of the ranks' agreement under DDP (detector/distributed.py StepAgreement).

Two gloo ranks on this machine's CPU run the same training steps with DDP's own overlapped gradient reduction
(the loss's plain all_reduce, no agreement: an out-of-memory error on one rank would hang the other) and with
the agreement (no_sync backward, one flattened gradient all_reduce per optimizer step, two small exchanges per
micro-batch), alternating in blocks; prints the median seconds per step of each and their ratio.

    python benchmarks/ddp_agreement_cost.py --imgsz 256 --batch 8 --steps 12 --scale n
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.multiprocessing as mp


def _rank(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from detector.distributed import StepAgreement
    from detector.model.loss import DetectionLoss
    from detector.model.network import build_model
    from detector.train.engine import StepContext, train_step
    from detector.train.optim import Schedule, build_optimizer
    from detector.train.probe import worst_case_targets

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = build_model(args.scale, 80)
    ddp = DistributedDataParallel(model)
    agreement = StepAgreement(torch.device("cpu"))
    generator = torch.Generator().manual_seed(rank)
    images = torch.randint(0, 256, (args.batch, 3, args.imgsz, args.imgsz), dtype=torch.uint8, generator=generator)
    targets = worst_case_targets(args.batch, image_size=args.imgsz, max_boxes=10, num_classes=80, generator=generator)
    times: dict[str, list[float]] = {"ddp": [], "agreement": []}
    for block in range(args.blocks):
        for mode in ("ddp", "agreement") if block % 2 == 0 else ("agreement", "ddp"):
            agreed = agreement if mode == "agreement" else None
            criterion = DetectionLoss(num_classes=80, strides=model.strides, reg_max=model.reg_max, world_size=2,
                                      all_reduce=agreed.sum_scores if agreed else torch.distributed.all_reduce)
            optimizer = build_optimizer(model, name="SGD", lr=1e-4, momentum=0.9, weight_decay=5e-4)
            schedule = Schedule(lr0=1e-4, lrf=1.0, epochs=1, iters_per_epoch=args.steps, warmup_iters=0,
                                warmup_bias_lr=0.0, warmup_momentum=0.9, momentum=0.9, accumulate=1)
            ctx = StepContext(model=ddp, criterion=criterion, optimizer=optimizer, schedule=schedule,
                              scaler=torch.amp.GradScaler("cpu", enabled=False), ema=None,
                              device=torch.device("cpu"), agreement=agreed)
            train_step(ctx, images, targets)  # warm-up
            for _ in range(args.steps):
                torch.distributed.barrier()
                started = time.perf_counter()
                train_step(ctx, images, targets)
                times[mode].append(time.perf_counter() - started)
    if rank == 0:
        with open(out, "w") as file:
            json.dump(times, file)
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="n")
    parser.add_argument("--imgsz", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="images per rank")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per block")
    parser.add_argument("--blocks", type=int, default=4, help="alternating blocks of each mode")
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "times.json")
        mp.start_processes(_rank, args=(args, port, out), nprocs=2, start_method="spawn")
        with open(out) as file:
            times = json.load(file)
    ddp, agreed = statistics.median(times["ddp"]), statistics.median(times["agreement"])
    print(f"scale {args.scale}, imgsz {args.imgsz}, {args.batch} images per rank, 2 gloo ranks, "
          f"{len(times['ddp'])} steps each")
    print(f"DDP overlapped: {ddp:.3f} s/step; with the agreement: {agreed:.3f} s/step; ratio {agreed / ddp:.3f}")


if __name__ == "__main__":
    main()
