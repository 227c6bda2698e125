"""Training on several processes with torch.distributed: one process (rank) per device, launched by torchrun.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE and LOCAL_WORLD_SIZE in each process's environment; without
them the run is a single process and every function here is a no-op. Rank 0 alone writes the run folder
(logs, plots, checkpoints) and validates; the others train and follow its decisions (run folder, when to
stop), which it broadcasts.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from detector.device import device_ops
from detector.errors import ConfigError, DetectorError

logger = logging.getLogger(__name__)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0



def setup(device: torch.device) -> torch.device:
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo on CPU); returns this rank's
    device: its own GPU (LOCAL_RANK among the visible ones) on CUDA, else `device`."""
    if world_size() == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
    return device


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank (any picklable object)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(function, *args, **kwargs) -> Any:
    """Run `function` on rank 0 and give its result, or its DetectorError, to every rank."""
    result, error = None, None
    if is_main():
        try:
            result = function(*args, **kwargs)
        except DetectorError as err:
            if world_size() == 1:
                raise
            error = f"{type(err).__name__}: {err}"
    result, error = broadcast((result, error))
    if error is not None:
        raise DetectorError(error)
    return result


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is True on any rank (all_reduce MAX); `flag` itself in one process."""
    if world_size() == 1:
        return flag
    value = device_ops(device).collective(torch.tensor([int(flag)]))
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def average_gradients(model: nn.Module) -> None:
    """Replace every rank's accumulated gradients by their mean over the ranks, in place.

    Inside an accumulation window DDP has not synchronised them yet (no_sync), and a checkpoint stores
    rank 0's. Averaging is linear, so the window's final synchronisation still gives the mean of all
    the window's gradients, whether the run goes on or resumes from the checkpoint.
    """
    if world_size() == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # one collective, not one per tensor
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(world_size())
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


class PeerOutOfMemory(RuntimeError):
    """Another rank ran out of memory (or had a non-finite loss) in this micro-batch: every rank drops it."""


class StepAgreement:
    """Every rank's say on the current micro-batch, folded into the one collective each point of the step makes.

    A training step under DDP has two points where all ranks meet: the loss's sum of target scores (after the
    forward pass) and the end of backward (which runs under no_sync, its gradients averaged at the end of the
    accumulation window). Both exchange [value, out of memory, non-finite loss]. A rank that runs out of memory
    anywhere in the micro-batch meets its peers at the point they wait at with `report_oom()`, so every rank
    learns it at the same point, drops the same micro-batch and splits the same way: no rank waits in a
    collective that another will never make. SyncBatchNorm's own collectives in the forward pass are not
    covered: with sync_bn on, an out-of-memory error in the forward pass ends the run.
    """

    def __init__(self, device: torch.device):
        self.ops = device_ops(device)

    def sum_scores(self, score_sum: torch.Tensor) -> None:
        """The loss's all_reduce (in place): the global batch's normaliser, or PeerOutOfMemory."""
        total, oom, _bad = self._exchange(score_sum.detach().reshape(()).double())
        if oom:
            raise PeerOutOfMemory("another rank ran out of memory in the forward pass")
        score_sum.copy_(total.to(score_sum.dtype))

    def after_backward(self, finite: bool) -> bool:
        """Meet after backward; True when every rank's loss was finite (else all skip the batch)."""
        _total, oom, bad = self._exchange(None, bad=not finite)
        if oom:
            raise PeerOutOfMemory("another rank ran out of memory in the backward pass")
        return not bad

    def report_oom(self) -> None:
        """This rank ran out of memory: tell the peers at the point they are waiting at."""
        self._exchange(None, oom=True)

    def _exchange(self, value: torch.Tensor | None, oom: bool = False,
                  bad: bool = False) -> tuple[torch.Tensor, bool, bool]:
        packed = torch.tensor([0.0, float(oom), float(bad)], dtype=torch.float64)
        packed = self.ops.collective(packed)
        if value is not None:
            packed[0] = value.to(packed.device)
        dist.all_reduce(packed)
        return packed[0], bool(packed[1] > 0), bool(packed[2] > 0)


def agree_on_batch(batch: int, device: torch.device) -> int:
    """The per-rank batch every rank can run: the smallest of the ranks' own choices (all_gather, then MIN)."""
    if world_size() == 1:
        return batch
    ops = device_ops(device)
    value = ops.collective(torch.tensor([batch], dtype=torch.int64))  # NCCL takes only tensors on the device
    choices = [torch.zeros_like(value) for _ in range(world_size())]
    dist.all_gather(choices, value)
    chosen = min(int(c) for c in choices)
    if is_main():
        logger.info("AutoBatch under DDP: per-rank choices %s -> %d per rank on all %d ranks, global batch %d",
                    [int(c) for c in choices], chosen, world_size(), chosen * world_size())
    return chosen


def wrap_model(model: nn.Module, device: torch.device, world: int, per_rank_batch: int,
               sync_bn: str) -> tuple[nn.Module, nn.Module]:
    """(model, what the training step calls): the model itself in a single process; under DDP the model
    (its batch norms made SyncBatchNorm when asked) and its DistributedDataParallel wrapper.

    sync_bn: "true", "false", or "auto": on when each rank sees fewer than 8 images per batch, since batch
    norm statistics of a few images are unreliable. torch's SyncBatchNorm runs on GPUs only.
    """
    if world == 1:
        return model, model
    wanted = sync_bn == "true" or (sync_bn == "auto" and per_rank_batch < 8)
    if wanted and device.type != "cuda":
        if sync_bn == "true":
            raise ConfigError("sync_bn=true needs CUDA devices (torch's SyncBatchNorm has no CPU kernel): "
                              "use sync_bn=auto or false")
        logger.info("per-rank batch %d: batch norm uses each rank's statistics (SyncBatchNorm needs GPUs)",
                    per_rank_batch)
    elif wanted:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        logger.info("SyncBatchNorm on: batch norm statistics over all %d ranks' images", world)
    wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, wrapped


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def rank_batch(batch: int, world: int) -> int:
    """The images per rank of a global batch, or a ConfigError naming the nearest global batches that split."""
    if batch % world == 0:
        return batch // world
    lower, upper = batch // world * world, (batch // world + 1) * world
    nearest = " or ".join(str(b) for b in (lower, upper) if b > 0)
    raise ConfigError(f"batch={batch} is the global batch and must split evenly over {world} ranks: "
                      f"use batch={nearest}")


def launch_command(devices: str, argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The torchrun command (and environment) that runs `detector train argv` on each GPU of `devices`
    ("0,1"): one rank per listed GPU, each seeing the listed GPUs as cuda:0, cuda:1, ..."""
    indices = [d.strip().removeprefix("cuda:") for d in devices.split(",") if d.strip()]
    if len(indices) < 2 or not all(d.isdigit() for d in indices) or len(set(indices)) != len(indices):
        raise ConfigError(f"invalid value device={devices!r}: expected distinct GPU indices like 0,1")
    args = [a for a in argv if not a.startswith("device=")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={len(indices)}",
               "-m", "detector", "train", *args, "device=0"]
    return command, {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(indices)}


def launch_ranks(overrides: dict[str, Any]) -> dict[str, float]:
    """Run a training on each GPU of overrides['device'] through torchrun; returns rank 0's metrics."""
    from detector.config import make_config
    from detector.runs import make_run_dir

    config = make_config(overrides)
    run_dir = make_run_dir(config.project, config.name, config.exist_ok)  # the ranks reuse this folder
    args = [f"{k}={v}" for k, v in {**overrides, "project": str(run_dir.parent), "name": run_dir.name,
                                    "exist_ok": True}.items()]
    command, env = launch_command(config.device, args)
    logger.info("launching %s", " ".join(command))
    if subprocess.run(command, env=env, check=False).returncode != 0:
        raise DetectorError(f"a rank of the distributed run failed: see its output above and {run_dir}/train.log")
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    return {key: value for key, value in metrics.items() if not isinstance(value, dict)}  # as train() returns
