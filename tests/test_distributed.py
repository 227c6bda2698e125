"""DDP on CPU with gloo: two ranks step like one process, agree on AutoBatch's batch, write one run folder."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from detector import distributed
from detector.autobatch.choose import choose_batch
from detector.distributed import launch_command, rank_batch
from detector.errors import ConfigError, DetectorError
from detector.model.loss import DetectionLoss
from detector.model.network import Detector
from detector.train.optim import Schedule, build_optimizer
from tests.conftest import TINY_SCALE, make_tiny_setup
from tests.test_autobatch import GIB, FakeDevice

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)


def _batch():
    generator = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=generator)
    targets = torch.tensor([[0, 0, 4, 4, 30, 40], [0, 1, 20, 8, 60, 30], [1, 2, 10, 10, 50, 50],
                            [2, 0, 0, 30, 25, 63], [3, 1, 5, 5, 20, 20], [3, 2, 30, 30, 62, 60]], dtype=torch.float32)
    return images, targets


def _one_step(model, criterion, images, targets) -> None:
    from detector.train.engine import StepContext, train_step

    optimizer = build_optimizer(model.module if hasattr(model, "module") else model, name="SGD", lr=0.05,
                                momentum=0.9, weight_decay=0.0005)
    schedule = Schedule(lr0=0.05, lrf=0.01, epochs=1, iters_per_epoch=1, warmup_iters=0, warmup_bias_lr=0.0,
                        warmup_momentum=0.8, momentum=0.9, accumulate=1)
    ctx = StepContext(model=model, criterion=criterion, optimizer=optimizer, schedule=schedule,
                      scaler=torch.amp.GradScaler("cpu", enabled=False), ema=None, device=torch.device("cpu"))
    assert train_step(ctx, images, targets) is not None
    assert ctx.state.optimizer_steps == 1


def _fresh_model() -> Detector:
    torch.manual_seed(0)
    model = Detector(num_classes=3, **TINY_SCALE)
    return model.eval()  # batch norm on its running statistics: per-rank batch statistics would differ


def _rank_step(rank: int, world: int, port: int, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    _join(rank, world, port)
    model = _fresh_model()
    criterion = DetectionLoss(num_classes=3, strides=model.strides, reg_max=model.reg_max, world_size=world,
                              all_reduce=torch.distributed.all_reduce)
    images, targets = _batch()
    share = len(images) // world
    mine = targets[(targets[:, 0] >= rank * share) & (targets[:, 0] < (rank + 1) * share)].clone()
    mine[:, 0] -= rank * share
    _one_step(DistributedDataParallel(model), criterion, images[rank * share:(rank + 1) * share], mine)
    if rank == 0:
        torch.save(model.state_dict(), out)
    torch.distributed.destroy_process_group()


def test_two_ranks_take_the_same_step_as_one_process_on_the_global_batch(tmp_path):
    out = str(tmp_path / "ddp.pt")
    mp.start_processes(_rank_step, args=(2, _free_port(), out), nprocs=2, start_method="spawn")
    ddp = torch.load(out, weights_only=True)

    # One thread, as in each rank: at initialisation some gradients are small sums of large terms, and
    # CPU convolutions sum in an order that depends on the thread count (2 threads moved some by 20%).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _fresh_model()
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        _one_step(model, DetectionLoss(num_classes=3, strides=model.strides, reg_max=model.reg_max), *_batch())
    finally:
        torch.set_num_threads(threads)
    single = model.state_dict()
    moved = [k for k in single if single[k].is_floating_point() and not torch.equal(single[k], initial[k])]
    assert len(moved) > 50  # the step changed the weights, so equal weights mean equal steps
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-6, msg=key)


def _rank_autobatch(rank: int, world: int, port: int, out: str) -> None:
    from detector.distributed import agree_on_batch

    _join(rank, world, port)
    device = FakeDevice(capacity=(80 if rank == 0 else 24) * GIB)  # rank 1 has the smaller device
    own = choose_batch(device, device, fraction=0.6, max_batch=100_000, measure_throughput=False).batch
    agreed = agree_on_batch(own, torch.device("cpu"))
    with open(f"{out}.{rank}", "w") as file:
        file.write(f"{own} {agreed}")
    torch.distributed.destroy_process_group()


def test_autobatch_under_ddp_puts_every_rank_on_the_smallest_ranks_batch(tmp_path):
    out = str(tmp_path / "choice")
    mp.start_processes(_rank_autobatch, args=(2, _free_port(), out), nprocs=2, start_method="spawn")
    (own0, agreed0), (own1, agreed1) = (map(int, open(f"{out}.{r}").read().split()) for r in (0, 1))
    assert own0 > own1  # the ranks measured different devices
    assert agreed0 == agreed1 == own1


@pytest.fixture(scope="module")
def tiny_card(tmp_path_factory):
    paths = make_tiny_setup(tmp_path_factory.mktemp("ddp"), seed=2, num_train=8, num_val=4, image_size=96)
    return paths["data"], paths["model"]


def test_torchrun_two_ranks_write_one_run_folder_and_resume_on_one(tiny_card, tmp_path):
    card, scale = tiny_card
    args = [f"data={card}", f"model={scale}", "imgsz=64", "batch=4", "workers=0", "mosaic=0", "close_mosaic=0",
            f"project={tmp_path}", "name=ddp", "plots=false"]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "detector", "train", *args, "epochs=1"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]  # rank 1 made no folder of its own
    weights = tmp_path / "ddp" / "weights"
    assert sorted(p.name for p in weights.iterdir()) == ["best.pt", "last.pt"]
    last = torch.load(weights / "last.pt", weights_only=True)
    assert last["plan"]["batch"] == 4 and last["plan"]["world_size"] == 2
    assert last["loop"]["iteration"] == 2  # 8 images in global batches of 4 (2 per rank)
    assert (run.stdout + run.stderr).count("run folder") == 1  # logged once, by rank 0

    # The same run continues in one process with the same global batch.
    resumed = subprocess.run([sys.executable, "-m", "detector", "train", f"resume={weights / 'last.pt'}",
                              "epochs=2", "workers=0"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    last = torch.load(weights / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and last["plan"]["world_size"] == 1 and last["plan"]["batch"] == 4
    assert len((tmp_path / "ddp" / "results.csv").read_text().strip().splitlines()) == 3  # header + 2 epochs


def test_global_batch_must_split_over_the_ranks():
    assert rank_batch(16, 4) == 4
    with pytest.raises(ConfigError, match="batch=12 or 16"):
        rank_batch(14, 4)


def test_device_list_launches_one_rank_per_gpu():
    command, env = launch_command("0,2", ["data=coco8.yaml", "device=0,2", "epochs=3"])
    assert "--nproc_per_node=2" in command and command[-1] == "device=0"
    assert "device=0,2" not in command and "epochs=3" in command
    assert env["CUDA_VISIBLE_DEVICES"] == "0,2"
    with pytest.raises(ConfigError, match="device"):
        launch_command("0,0", [])


def test_launched_ranks_return_what_train_returns_in_one_process(tmp_path, monkeypatch):
    """The ranks write one run folder; the launcher returns its metrics.json without the per-class details."""
    def fake_torchrun(command, env, check):
        args = dict(arg.split("=", 1) for arg in command if "=" in arg and not arg.startswith("--"))
        run_dir = tmp_path / "runs" / args["name"]
        assert args["project"] == str(tmp_path / "runs") and run_dir.is_dir() and args["exist_ok"] == "True"
        metrics = {"metrics/mAP50-95": 0.25, "fitness": 0.3, "run_dir": str(run_dir), "epochs_run": 3,
                   "per_class": {"cat": {"instances": 4}}, "confusion_matrix": {"cat": {"cat": 4}}}
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
        return subprocess.CompletedProcess(command, returncode=int(args["name"] == "broken"))

    monkeypatch.setattr(distributed.subprocess, "run", fake_torchrun)
    overrides = {"device": "0,1", "project": str(tmp_path / "runs"), "epochs": 3}
    assert distributed.launch_ranks(overrides) == {"metrics/mAP50-95": 0.25, "fitness": 0.3, "epochs_run": 3,
                                                   "run_dir": str(tmp_path / "runs" / "train")}
    with pytest.raises(DetectorError, match="a rank of the distributed run failed"):
        distributed.launch_ranks({**overrides, "name": "broken"})
