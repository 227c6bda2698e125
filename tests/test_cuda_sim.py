"""The CUDA stand-in itself (tests/cuda_sim.py): the caching allocator's rounding, cache, peak and wall; NCCL's rule."""

import pytest
import torch
import torch.distributed as dist

from detector.autobatch.memory import CudaMemory, is_out_of_memory, probe_for
from detector.device import DeviceOps, amp_dtype_for, device_ops
from tests.cuda_sim import GIB, MIB, NCCL_CPU_ERROR, SimulatedCuda, fake_nccl


def block(nbytes: int) -> torch.Tensor:
    """A tensor whose storage is `nbytes` bytes, made by an op (so the simulation sees it)."""
    return torch.empty(nbytes, dtype=torch.uint8).fill_(1)


@pytest.mark.parametrize(("nbytes", "allocated", "reserved"), [
    (1, 512, 2 * MIB),  # 512-byte blocks, from a 2 MiB small-pool segment
    (MIB + 1, MIB + 512, 20 * MIB),  # past 1 MiB: the large pool, a 20 MiB segment for requests under 10 MiB
    (15 * MIB, 16 * MIB, 16 * MIB),  # a segment of its own, rounded up to 2 MiB; the 1 MiB rest is too small to split
    (100 * MIB, 100 * MIB, 100 * MIB),
])
def test_requests_round_as_the_caching_allocator_rounds_them(nbytes, allocated, reserved):
    with SimulatedCuda(capacity=GIB) as device:
        tensor = block(nbytes)
        assert (device.allocated(), device.reserved()) == (allocated, reserved)
        del tensor
        assert (device.allocated(), device.reserved()) == (0, reserved)


def test_requests_share_segments_and_reuse_freed_blocks_until_empty_cache():
    with SimulatedCuda(capacity=GIB) as device:
        small = [block(1000) for _ in range(8)]
        assert device.reserved() == 2 * MIB  # eight small blocks in one 2 MiB segment
        large = [block(4 * MIB) for _ in range(5)]
        assert device.reserved() == 2 * MIB + 20 * MIB  # five 4 MiB blocks split from one 20 MiB segment
        del large[0]
        again = block(3 * MIB)  # fits the freed 4 MiB block: no new segment
        assert device.reserved() == 22 * MIB
        del small, again
        device.empty_cache()  # the small segment is wholly free; the large one still holds four blocks
        assert device.reserved() == 20 * MIB
        del large
        device.empty_cache()
        assert device.reserved() == 0


def test_peak_is_the_most_reserved_since_reset():
    with SimulatedCuda(capacity=GIB) as device:
        first = block(100 * MIB)
        del first
        # Best fit: the cached 100 MiB block is the smallest that holds 30 MiB, so it is split, no segment is added.
        second = block(30 * MIB)
        assert device.reserved() == device.peak_reserved() == 100 * MIB
        device.empty_cache()  # the segment still holds `second`, so it stays
        device.reset_peak()
        assert device.peak_reserved() == device.reserved() == 100 * MIB
        del second
        device.empty_cache()
        assert device.peak_reserved() == 100 * MIB  # the peak outlives the release ...
        device.reset_peak()
        assert device.peak_reserved() == 0  # ... until the next reset


def test_allocation_past_capacity_raises_cuda_out_of_memory_after_releasing_the_cache():
    with SimulatedCuda(capacity=64 * MIB) as device:
        kept = block(40 * MIB)
        with pytest.raises(torch.OutOfMemoryError) as caught:
            block(40 * MIB)
        message = str(caught.value)
        assert message.startswith("CUDA out of memory. Tried to allocate 40.00 MiB. GPU 0 has a total capacity of "
                                  "64.00 MiB of which 24.00 MiB is free.")
        assert is_out_of_memory(caught.value)
        assert device.reserved() == 40 * MIB  # nothing was charged for the failed request
        del kept
        larger = block(50 * MIB)  # the cached 40 MiB segment is released to make room, as the allocator does
        assert device.reserved() == 50 * MIB
        del larger


def test_memory_of_other_processes_reduces_free_memory_and_the_wall():
    with SimulatedCuda(capacity=GIB, other_bytes=400 * MIB) as device:
        kept = block(100 * MIB)
        assert device.mem_get_info() == (GIB - 500 * MIB, GIB)
        probe = probe_for("cpu")
        assert isinstance(probe, CudaMemory)
        assert probe.capacity() == GIB - 400 * MIB  # free plus what this process holds
        with pytest.raises(torch.OutOfMemoryError):
            block(600 * MIB)  # fits the device, not what the other process left
        del kept


def test_tensors_made_before_the_simulation_count_from_their_first_op_and_scale_multiplies():
    weights = torch.zeros(MIB // 4)  # 1 MiB of float32, made outside (like a model's parameters)
    with SimulatedCuda(capacity=GIB, scale=64) as device:
        assert device.allocated() == 0
        weights.add_(1)  # the first op that touches it charges it, 64 times its bytes
        assert device.allocated() == 64 * MIB
        del weights
        assert device.allocated() == 0


def test_the_cpu_device_answers_as_the_simulated_one_only_inside():
    device = torch.device("cpu")
    with SimulatedCuda(capacity=GIB, capability=(7, 5)) as simulated:
        assert device_ops(device) is simulated and device_ops(device).kind == "cuda"
        assert amp_dtype_for(True, device) == torch.float16  # below 8.0: fp16 with GradScaler
    assert type(device_ops(device)) is DeviceOps
    with SimulatedCuda(capacity=GIB, capability=(8, 0)):
        assert amp_dtype_for(True, device) == torch.bfloat16


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fake_nccl_refuses_host_tensors_and_takes_the_devices(one_rank_group):
    with SimulatedCuda(capacity=GIB) as device, fake_nccl(device):
        with pytest.raises(RuntimeError, match=NCCL_CPU_ERROR):
            dist.all_reduce(torch.tensor([3]))
        value = device.collective(torch.tensor([3]))
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        gathered = [torch.zeros_like(value)]  # made from a device tensor: on the device too
        dist.all_gather(gathered, value)
        assert int(gathered[0]) == 3
        with pytest.raises(RuntimeError, match=NCCL_CPU_ERROR):
            dist.all_gather([torch.zeros(1, dtype=torch.int64)], value)  # one host tensor in the list
        with pytest.raises(RuntimeError, match=NCCL_CPU_ERROR):
            dist.broadcast(torch.tensor([1]), src=0)
    dist.all_reduce(torch.tensor([3]))  # outside, gloo takes host tensors again
