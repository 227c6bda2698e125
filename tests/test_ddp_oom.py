"""Out of memory under DDP: every rank takes the same decision at the same point of the step (2 gloo ranks)."""

import json
import time

import pytest
import torch
import torch.multiprocessing as mp

from detector.distributed import StepAgreement
from detector.model.loss import DetectionLoss
from detector.model.network import Detector
from detector.train.engine import StepContext, train_step
from detector.train.optim import Schedule, build_optimizer
from tests.conftest import TINY_SCALE
from tests.test_distributed import _batch, _free_port, _join

STEPS, INJECT_AT = 4, 2  # the injected failure hits the second batch


def _rank(rank: int, world: int, port: int, out: str, where: str, failing_rank: int) -> None:
    from torch.nn.parallel import DistributedDataParallel

    _join(rank, world, port)
    torch.manual_seed(0)
    model = Detector(num_classes=3, **TINY_SCALE).eval()  # running statistics: ranks' batches would differ
    agreement = StepAgreement(torch.device("cpu"))
    criterion = DetectionLoss(num_classes=3, strides=model.strides, reg_max=model.reg_max, world_size=world,
                              all_reduce=agreement.sum_scores)
    optimizer = build_optimizer(model, name="SGD", lr=0.05, momentum=0.9, weight_decay=0.0005)
    schedule = Schedule(lr0=0.05, lrf=0.01, epochs=1, iters_per_epoch=STEPS, warmup_iters=0, warmup_bias_lr=0.0,
                        warmup_momentum=0.8, momentum=0.9, accumulate=2)
    ctx = StepContext(model=DistributedDataParallel(model), criterion=criterion, optimizer=optimizer,
                      schedule=schedule, scaler=torch.amp.GradScaler("cpu", enabled=False), ema=None,
                      device=torch.device("cpu"), agreement=agreement)
    calls = {"n": 0}
    if rank == failing_rank:
        _inject(model, where, calls)
    images, targets = _batch()
    share = len(images) // world
    mine = targets[(targets[:, 0] >= rank * share) & (targets[:, 0] < (rank + 1) * share)].clone()
    mine[:, 0] -= rank * share
    for _ in range(STEPS):
        train_step(ctx, images[rank * share:(rank + 1) * share], mine)
    torch.save(model.state_dict(), f"{out}.{rank}.pt")
    with open(f"{out}.{rank}.json", "w") as file:
        json.dump({"splits": ctx.state.splits, "steps": ctx.state.optimizer_steps, "events": ctx.state.oom_events,
                   "iteration": ctx.state.iteration}, file)
    torch.distributed.destroy_process_group()


def _inject(model: Detector, where: str, calls: dict) -> None:
    """Raise the device's out-of-memory error once, in the forward or the backward pass of batch INJECT_AT, or
    make that batch's loss NaN ("nan")."""
    def forward_hook(module, inputs):
        calls["n"] += 1
        if where == "forward" and calls["n"] == INJECT_AT:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        if where == "nan" and calls["n"] == INJECT_AT:
            return (inputs[0] * float("nan"),)  # this rank's loss is not finite

    def backward_hook(grad):
        if where == "backward" and calls["n"] == INJECT_AT and not calls.get("done"):
            calls["done"] = True
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return grad

    model.register_forward_pre_hook(forward_hook)
    next(model.parameters()).register_hook(backward_hook)


def _run(tmp_path, where: str, failing_rank: int) -> list[dict]:
    out = str(tmp_path / where)
    context = mp.start_processes(_rank, args=(2, _free_port(), out, where, failing_rank), nprocs=2,
                                 start_method="spawn", join=False)
    deadline = time.monotonic() + 120  # a rank waiting in a collective the other never makes would hang: fail
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):  # True once every rank has exited
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"ranks still running after 120 s: a rank is waiting in a collective ({where})")
    return [json.load(open(f"{out}.{r}.json")) for r in (0, 1)], [torch.load(f"{out}.{r}.pt") for r in (0, 1)]


@pytest.mark.parametrize(("where", "failing_rank"), [("forward", 1), ("backward", 1), ("backward", 0)])
def test_an_out_of_memory_on_one_rank_splits_every_rank_at_the_same_batch(tmp_path, where, failing_rank):
    states, weights = _run(tmp_path, where, failing_rank)
    assert states[0] == states[1]  # the same splits, events and steps on both ranks
    assert states[0]["splits"] == 2 and len(states[0]["events"]) == 1
    assert states[0]["events"][0]["iteration"] == INJECT_AT and states[0]["iteration"] == STEPS
    assert states[0]["steps"] == 1  # accumulate 2: the window restarted at batch 2, stepped after batch 3
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=0, atol=0, msg=key)


def test_the_ranks_skip_a_batch_together_when_one_loss_is_not_finite(tmp_path):
    states, weights = _run(tmp_path, "nan", 1)
    assert states[0] == states[1] and states[0]["splits"] == 1 and states[0]["iteration"] == STEPS
    assert states[0]["steps"] == 1  # batch 2 skipped on both ranks: its window restarted, stepped after batch 4
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=0, atol=0, msg=key)

