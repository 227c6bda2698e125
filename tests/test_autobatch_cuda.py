"""AutoBatch's CUDA path, run by the real code on a simulated CUDA device (tests/cuda_sim.py).

The choice against its target and one epoch trained at it, a device shared with another process, a device too
small for one image, the probe meeting the device's out-of-memory error, the AMP dtype and GradScaler by
compute capability, the trainer's recovery from an out-of-memory error, and the DDP agreement under NCCL's rule.

The simulated device charges each tensor SCALE times its CPU bytes. A 64-pixel step of the tiny model then
meets the caching allocator with tensors of a GPU step's size (several MiB: segments of their own, or 20 MiB
ones); at their own size every tensor would sit in 2 MiB segments, and memory would grow in steps as large as
a whole image's share, which no fit follows. Simulated steps take seconds on a shared CPU where a GPU takes
milliseconds, so AutoBatch's 15 s sampling budget is lifted (`no_time_budget`).
"""

import contextlib
import functools
import json
import math
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detector.autobatch.choose import AutoBatchError, choose_batch
from detector.autobatch.memory import probe_for
from detector.autobatch.records import VERIFY_TOLERANCE, Decision, gib
from detector.device import DeviceOps, amp_dtype_for, simulated_device
from detector.distributed import agree_on_batch, any_rank
from detector.model.loss import DetectionLoss
from detector.model.network import Detector
from detector.train import engine, plan
from detector.train.probe import make_probe_step
from detector.train.trainer import Trainer
from tests.conftest import TINY_SCALE, make_tiny_setup
from tests.cuda_sim import GIB, MIB, NCCL_CPU_ERROR, SimulatedCuda, fake_nccl

SCALE = 64
IMAGE_SIZE = 64
MOSAIC_BOXES = 48  # the probe's boxes per image: a mosaic of four dense images


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_tiny_setup(tmp_path_factory.mktemp("data"), seed=3, num_train=32, num_val=4, image_size=IMAGE_SIZE)


def settings(data, root, **extra):
    return {**data, "imgsz": IMAGE_SIZE, "workers": 0, "project": str(root), "name": "run", "plots": False,
            "epochs": 1, "val": False, "mosaic": 1.0, "close_mosaic": 0, "warmup_epochs": 0.5, **extra}


@contextlib.contextmanager
def no_time_budget():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plan, "choose_batch", functools.partial(choose_batch, time_budget_s=math.inf))
        yield


@contextlib.contextmanager
def recorded_splits():
    """The batches the training loop's out-of-memory recovery split (engine._split_after_oom), in order."""
    splits, split = [], engine._split_after_oom

    def recording(ctx, batch):
        splits.append(batch)
        return split(ctx, batch)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "_split_after_oom", recording)
        yield splits


@pytest.fixture(scope="module")
def run_at_90(tiny_data, tmp_path_factory):
    """batch=0.9 on a 1 GiB device: AutoBatch in the trainer, then one epoch at its choice."""
    with SimulatedCuda(capacity=GIB, scale=SCALE) as device, no_time_budget(), recorded_splits() as splits:
        trainer = Trainer(settings(tiny_data, tmp_path_factory.mktemp("runs"), batch=0.9), progress=False)
        splits_while_choosing = list(splits)
        device.reset_peak()
        trainer.fit()
        epoch_peak = device.peak_reserved()
    saved = json.loads((trainer.run_dir / "autobatch.json").read_text())
    return SimpleNamespace(trainer=trainer, decision=Decision.from_dict(saved["train"]), epoch_peak=epoch_peak,
                           splits_while_choosing=splits_while_choosing)


def test_batch_at_90_percent_lands_on_the_target_and_trains_an_epoch_without_oom(run_at_90):
    decision, trainer = run_at_90.decision, run_at_90.trainer
    assert decision.device == "cuda:simulated" and not decision.throughput  # the CUDA path, memory decides
    assert decision.capacity_bytes == GIB and decision.budget_bytes == int(0.9 * GIB)
    assert decision.decided_by == "memory" and decision.batch > 1
    assert trainer.plan.batch == decision.batch and trainer.plan.batch_source == "memory"
    # Verified on three steps in a row at the chosen batch.
    assert decision.verified_steps == 3 and decision.checks[-1].batch == decision.batch
    assert decision.checks[-1].steps == 3 and decision.checks[-1].peak_bytes == decision.verified_peak_bytes
    ratio = decision.verified_peak_bytes / decision.budget_bytes
    assert 0.90 <= ratio <= VERIFY_TOLERANCE, decision.log_line()
    # The epoch at that batch (real mosaics, fewer boxes than the probe's worst case) stayed within the target.
    assert trainer.ctx.state.oom_events == [] and not (trainer.run_dir / "oom_events.json").exists()
    assert run_at_90.epoch_peak <= decision.budget_bytes * VERIFY_TOLERANCE, run_at_90.epoch_peak / MIB


def test_the_probe_sees_the_devices_out_of_memory_error_and_does_not_split(run_at_90):
    samples = run_at_90.decision.samples
    failed = [s for s in samples if not s.ok]
    assert len(failed) == 1 and failed[0] is samples[-1]  # sampling stopped at the batch that did not fit
    assert failed[0].error.startswith("OutOfMemoryError: CUDA out of memory. Tried to allocate")
    assert run_at_90.decision.batch < failed[0].batch
    assert run_at_90.splits_while_choosing == []  # the probe's whole_step has no out-of-memory recovery


@pytest.fixture(scope="module")
def probe_step():
    """make() -> the real training step as AutoBatch measures it (AdamW, EMA, the AMP dtype of the simulated device
    active when it is made)."""
    torch.manual_seed(0)
    model = Detector(num_classes=4, **TINY_SCALE)
    criterion = DetectionLoss(num_classes=4, strides=model.strides, reg_max=model.reg_max)

    def make():
        return make_probe_step(model, criterion, image_size=IMAGE_SIZE, max_boxes=MOSAIC_BOXES, num_classes=4,
                               device="cpu", amp_dtype=amp_dtype_for(True, torch.device("cpu")), optimizer_name="AdamW")

    return make


def test_a_shared_device_chooses_from_its_free_memory_and_verifies_on_three_steps(probe_step):
    capacity = 1536 * MIB
    # Capability 7.5 (a T4, say): the probe trains in fp16 with its GradScaler on.
    with SimulatedCuda(capacity=capacity, scale=SCALE, capability=(7, 5)) as device:
        step, events = probe_step(), []
        empty_cache = device.empty_cache

        def watched_step(batch):
            events.append(f"step {batch}")
            step(batch)

        def watched_empty_cache():
            events.append("empty_cache")
            empty_cache()

        device.empty_cache = watched_empty_cache
        choose = functools.partial(choose_batch, watched_step, probe_for("cpu"), fraction=0.9, max_batch=1000,
                                   measure_throughput=False, time_budget_s=math.inf)
        alone = choose()
        verify_events = events[len(events) - 4:]
        device.other_bytes = int(0.4 * capacity)  # another process takes 40% of the device
        shared = choose()
    assert alone.capacity_bytes == capacity and shared.capacity_bytes == capacity - int(0.4 * capacity)
    assert 1 < shared.batch < alone.batch
    for decision in (alone, shared):
        assert decision.decided_by == "memory"
        assert decision.verified_peak_bytes <= decision.budget_bytes * VERIFY_TOLERANCE, decision.log_line()
    # The verification: the cache released once, then three steps at the chosen batch with nothing released between.
    assert verify_events == ["empty_cache"] + [f"step {alone.batch}"] * 3


def test_a_device_too_small_for_one_image_names_the_image_size_and_its_memory(probe_step):
    with SimulatedCuda(capacity=400 * MIB, scale=SCALE):
        step = probe_step()
        with pytest.raises(AutoBatchError) as caught:
            choose_batch(step, probe_for("cpu"), fraction=0.9, max_batch=32, measure_throughput=False,
                         image_size=IMAGE_SIZE, label="training")
    message = str(caught.value)
    assert "training step at batch 1 already runs out of memory at imgsz 64 on cuda:simulated" in message
    assert f"this process has {gib(400 * MIB)} GiB" in message and "CUDA out of memory" in message


def test_training_on_a_device_too_small_for_one_image_names_the_image_size(tiny_data, tmp_path):
    with SimulatedCuda(capacity=400 * MIB, scale=SCALE), pytest.raises(AutoBatchError) as caught:
        Trainer(settings(tiny_data, tmp_path, batch=0.9), progress=False)
    assert "at imgsz 64" in str(caught.value) and f"{gib(400 * MIB)} GiB" in str(caught.value)


def test_a_device_too_small_for_the_probes_model_copies_is_an_autobatch_error(tiny_data, tmp_path):
    with SimulatedCuda(capacity=200 * MIB, scale=SCALE), pytest.raises(AutoBatchError, match="imgsz 64"):
        Trainer(settings(tiny_data, tmp_path, batch=0.9), progress=False)


@pytest.mark.parametrize(("capability", "dtype", "scaled"), [((7, 5), torch.float16, True),
                                                             ((8, 0), torch.bfloat16, False)])
def test_the_compute_capability_sets_the_amp_dtype_and_the_grad_scaler(tiny_data, tmp_path, capability, dtype, scaled):
    with SimulatedCuda(capacity=8 * GIB, capability=capability):
        trainer = Trainer(settings(tiny_data, tmp_path, batch=8, nbs=8, warmup_epochs=0), progress=False)
        ctx = trainer.ctx
        assert trainer.plan.amp_dtype == str(dtype).removeprefix("torch.") and ctx.amp_dtype == dtype
        assert ctx.scaler.is_enabled() == scaled
        first_conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
        dtypes = []
        first_conv.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
        batch = next(iter(trainer.loader(True)))
        items = engine.train_step(ctx, batch.images, batch.targets)
    assert dtypes == [dtype]  # the step ran under autocast in that dtype
    assert items is not None and all(math.isfinite(float(v)) for v in items.values())
    assert ctx.state.optimizer_steps == 1
    if scaled:  # the loss went through the scaler (an overflow only halves the scale and skips the step)
        assert 0 < ctx.scaler.get_scale() <= 2.0**16


def test_an_out_of_memory_error_mid_epoch_splits_the_batch_and_training_finishes(tiny_data, tmp_path):
    # At batch 16 the first step fits; the second also holds AdamW's state (made by the first) and does not.
    with SimulatedCuda(capacity=950 * MIB, scale=SCALE) as device, recorded_splits() as splits:
        trainer = Trainer(settings(tiny_data, tmp_path, batch=16, nbs=16), progress=False)
        trainer.fit()
        peak = device.peak_reserved()
    events = json.loads((trainer.run_dir / "oom_events.json").read_text())
    assert splits == [16]
    assert events == [{"iteration": 2, "micro_batch_before": 16, "micro_batch_after": 8, "dropped_batches": 0}]
    assert trainer.ctx.state.splits == 2 and trainer.ctx.state.oom_events == events
    # The effective batch is unchanged: the loader's batch, the plan and the optimizer steps of the epoch.
    assert trainer.plan.batch == 16 and trainer.plan.accumulate == 1
    assert trainer.rows[-1]["optimizer_steps"] == 2 and peak <= 950 * MIB


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_agrees(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cpu, own = torch.device("cpu"), (12, 7)[rank]
    result = {}
    with SimulatedCuda(capacity=GIB) as device, fake_nccl(device):
        result["agreed"] = agree_on_batch(own, cpu)
        result["any"] = any_rank(rank == 1, cpu)
        # The old way, the host tensor straight into the collective (a CPU device's collective() is the identity):
        with simulated_device(DeviceOps()):
            try:
                agree_on_batch(own, cpu)
            except RuntimeError as err:
                result["host_tensor_error"] = str(err)
    with open(f"{out}.{rank}", "w") as file:
        json.dump(result, file)
    dist.destroy_process_group()


def test_ranks_agree_on_the_smallest_batch_with_device_tensors_under_nccls_rule(tmp_path):
    out = str(tmp_path / "rank")
    mp.start_processes(_rank_agrees, args=(2, _free_port(), out), nprocs=2, start_method="spawn")
    results = [json.loads(open(f"{out}.{rank}").read()) for rank in (0, 1)]
    assert [r["agreed"] for r in results] == [7, 7]
    assert [r["any"] for r in results] == [True, True]
    assert [r["host_tensor_error"] for r in results] == [NCCL_CPU_ERROR] * 2
