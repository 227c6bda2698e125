"""A stand-in for one CUDA device in CPU tests: PyTorch's caching allocator over the CPU's tensors, and NCCL's rule.

`SimulatedCuda` answers as a CUDA device through detector.device's seam (`simulated_device`), so the code under
test takes its CUDA branches (AutoBatch's CudaMemory probe, amp_dtype_for's capability check, the engine's
empty_cache after an out-of-memory error, the collectives' device tensors) while every tensor stays on the CPU.
A TorchDispatchMode charges each tensor storage an op makes or touches to a model of the CUDA caching allocator
(c10/cuda/CUDACachingAllocator.cpp), which answers reserved(), peak_reserved() and mem_get_info() and raises
torch.OutOfMemoryError past the device's capacity. `scale` charges each storage that many times its CPU bytes,
so that a small CPU step meets the allocator with tensors of a GPU step's size.

Modelled: requests round up to 512-byte blocks; requests up to 1 MiB come from the small pool's 2 MiB segments,
larger ones from 20 MiB segments (under 10 MiB) or a segment of their own rounded up to 2 MiB; a request takes the
smallest free block of its pool that holds it and splits off the rest when that is at least 512 bytes (small
pool) or more than 1 MiB (large pool); a freed block merges with its free neighbours and stays reserved until
empty_cache() returns the wholly-free segments; a segment that would pass capacity - other_bytes first makes the
allocator return its wholly-free segments, then raises CUDA's out-of-memory error.
Left out: streams (a block is free for reuse once its tensor dies), expandable segments and other
PYTORCH_CUDA_ALLOC_CONF settings, oversize blocks, the CUDA context (count it in `other_bytes`), and memory no
storage shows (cuDNN/cuBLAS workspaces, an op's internal temporaries). Everything made inside the simulation is
charged, host tensors included (a loader's uint8 batch), and a tensor made before it from its first op.

`fake_nccl` makes torch.distributed's all_reduce, all_gather and broadcast refuse, as NCCL does, tensors that are
not on the device: those returned by `SimulatedCuda.collective` and those ops derive from them. DDP's reducer (C++)
and broadcast_object_list (which NCCL places itself) are not checked.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from detector.device import DeviceOps, simulated_device

KIB, MIB, GIB = 2**10, 2**20, 2**30
MIN_BLOCK = 512  # every request rounds up to a multiple of this
SMALL_REQUEST = 1 * MIB  # requests up to this come from the small pool
SMALL_SEGMENT = 2 * MIB  # the small pool's segments
LARGE_SEGMENT = 20 * MIB  # segments of large requests under MIN_LARGE_ALLOC
MIN_LARGE_ALLOC = 10 * MIB  # from here a request gets a segment of its own ...
ROUND_LARGE = 2 * MIB  # ... rounded up to a multiple of this


def round_request(nbytes: int) -> int:
    """The block size the allocator hands out for a request of `nbytes` (a multiple of 512, at least 512)."""
    return max(-(-nbytes // MIN_BLOCK) * MIN_BLOCK, MIN_BLOCK)


def segment_size(block_bytes: int) -> int:
    """The segment cudaMalloc'd for a rounded request that no cached block holds."""
    if block_bytes <= SMALL_REQUEST:
        return SMALL_SEGMENT
    if block_bytes < MIN_LARGE_ALLOC:
        return LARGE_SEGMENT
    return -(-block_bytes // ROUND_LARGE) * ROUND_LARGE


def format_size(nbytes: int) -> str:
    """Bytes as c10's format_size writes them in CUDA's out-of-memory message."""
    if nbytes <= KIB:
        return f"{nbytes} bytes"
    for unit, size in (("KiB", KIB), ("MiB", MIB)):
        if nbytes <= size * 1024:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes / GIB:.2f} GiB"


@dataclass
class _Block:
    offset: int
    size: int
    owner: int | None = None  # the storage key holding it; None = free


@dataclass
class _Segment:
    number: int
    size: int
    small: bool
    blocks: dict[int, _Block] = field(default_factory=dict)  # by offset
    ends: dict[int, int] = field(default_factory=dict)  # end offset -> offset of the block ending there


class CachingAllocator:
    """Block and segment bookkeeping of one device (see the module docstring for what it models).

    Storages are identified by a key (the storage's address while it lives). `limit()` is the most the
    process may reserve: the device's capacity less what other processes hold.
    """

    def __init__(self, limit, device_name: str, capacity: int):
        self.limit, self.device_name, self.capacity = limit, device_name, capacity
        self.segments: dict[int, _Segment] = {}
        self.free_blocks = {True: [], False: []}  # pool (small?) -> sorted (size, segment, offset)
        self.owned: dict[int, tuple[_Segment, _Block]] = {}
        self.reserved = self.allocated = self.peak = 0
        self._next_segment = 0

    def malloc(self, key: int, nbytes: int) -> None:
        """Give storage `key` a block for `nbytes`; raises torch.OutOfMemoryError past the limit."""
        size = round_request(nbytes)
        small = size <= SMALL_REQUEST
        found = self._best_fit(size, small)
        if found is None:
            new = segment_size(size)
            if self.reserved + new > self.limit():
                self.empty_cache()  # the real allocator frees its cached segments before it gives up
            if self.reserved + new > self.limit():
                raise torch.OutOfMemoryError(self._oom_message(size))
            found = self._new_segment(new, small)
        segment, block = found
        self._take(segment, block, size)
        block.owner = key
        self.owned[key] = (segment, block)
        self.allocated += block.size

    def free(self, key: int) -> None:
        """Return storage `key`'s block to its pool (it stays reserved), merged with free neighbours."""
        segment, block = self.owned.pop(key)
        self.allocated -= block.size
        block.owner = None
        following = segment.blocks.get(block.offset + block.size)
        if following is not None and following.owner is None:
            self._unlist(segment, following)
            block = self._merge(segment, block, following)
        start = segment.ends.get(block.offset)
        if start is not None and segment.blocks[start].owner is None:
            self._unlist(segment, segment.blocks[start])
            block = self._merge(segment, segment.blocks[start], block)
        self._list(segment, block)

    def empty_cache(self) -> None:
        """Release every wholly-free segment back to the device."""
        for segment in list(self.segments.values()):
            block = segment.blocks[0]
            if block.owner is None and block.size == segment.size:
                self._unlist(segment, block)
                del self.segments[segment.number]
                self.reserved -= segment.size

    def _best_fit(self, size: int, small: bool) -> tuple[_Segment, _Block] | None:
        pool = self.free_blocks[small]
        index = bisect.bisect_left(pool, (size, -1, -1))
        if index == len(pool):
            return None
        _size, number, offset = pool.pop(index)
        segment = self.segments[number]
        return segment, segment.blocks[offset]

    def _new_segment(self, size: int, small: bool) -> tuple[_Segment, _Block]:
        segment = _Segment(self._next_segment, size, small)
        self._next_segment += 1
        block = _Block(0, size)
        segment.blocks[0], segment.ends[size] = block, 0
        self.segments[segment.number] = segment
        self.reserved += size
        self.peak = max(self.peak, self.reserved)
        return segment, block

    def _take(self, segment: _Segment, block: _Block, size: int) -> None:
        """Split the rest off `block` (already off the free list) when the pool's rule allows."""
        rest = block.size - size
        if rest >= MIN_BLOCK if segment.small else rest > SMALL_REQUEST:
            remainder = _Block(block.offset + size, rest)
            del segment.ends[block.offset + block.size]
            block.size = size
            segment.blocks[remainder.offset] = remainder
            segment.ends[block.offset + size] = block.offset
            segment.ends[remainder.offset + rest] = remainder.offset
            self._list(segment, remainder)

    def _merge(self, segment: _Segment, first: _Block, second: _Block) -> _Block:
        del segment.blocks[second.offset], segment.ends[first.offset + first.size]
        first.size += second.size
        segment.ends[first.offset + first.size] = first.offset
        return first

    def _list(self, segment: _Segment, block: _Block) -> None:
        bisect.insort(self.free_blocks[segment.small], (block.size, segment.number, block.offset))

    def _unlist(self, segment: _Segment, block: _Block) -> None:
        pool = self.free_blocks[segment.small]
        pool.pop(bisect.bisect_left(pool, (block.size, segment.number, block.offset)))

    def _oom_message(self, size: int) -> str:
        free = max(self.limit() - self.reserved, 0)
        return (f"CUDA out of memory. Tried to allocate {format_size(size)}. GPU 0 has a total capacity of "
                f"{format_size(self.capacity)} of which {format_size(free)} is free. Including non-PyTorch memory, "
                f"this process has {format_size(self.reserved)} memory in use. Of the allocated memory "
                f"{format_size(self.allocated)} is allocated by PyTorch, and "
                f"{format_size(self.reserved - self.allocated)} is reserved by PyTorch but unallocated. "
                f"(simulated device {self.device_name})")


class _Charger(TorchDispatchMode):
    """Charges every live CPU tensor storage an op makes or touches to the device, once, until it is freed.

    Storages are keyed by their C++ address while they live (a weakref finalizer frees the block), as in
    detector/autobatch/memory.py's _StorageCounter. It also carries "on the device" from an op's inputs to
    its outputs, for fake_nccl.
    """

    def __init__(self, device: SimulatedCuda):
        super().__init__()
        self.device = device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs, outputs = _tensors((args, kwargs), []), _tensors(out, [])
        for tensor in inputs + outputs:
            self.device.charge(tensor.untyped_storage())
        if any(self.device.on_device(t) for t in inputs):
            for tensor in outputs:
                self.device.mark(tensor)
        return out


def _tensors(value, found: list[torch.Tensor]) -> list[torch.Tensor]:
    """The strided CPU tensors in an op's (nested) arguments or results; faster than torch's tree_flatten."""
    if isinstance(value, torch.Tensor):
        if value.layout == torch.strided and value.device.type == "cpu":
            found.append(value)
    elif isinstance(value, list | tuple):
        for item in value:
            _tensors(item, found)
    elif isinstance(value, dict):
        for item in value.values():
            _tensors(item, found)
    return found


class SimulatedCuda(DeviceOps):
    """A CUDA device of `capacity` bytes and compute `capability` whose tensors live on the CPU.

    Use it as a context manager: inside, the CPU device answers as this device (detector.device.device_ops)
    and tensor storages are charged to its allocator. `other_bytes` is what other processes hold on it.
    """

    kind = "cuda"

    def __init__(self, *, capacity: int, capability: tuple[int, int] = (8, 0), other_bytes: int = 0, scale: int = 1,
                 name: str = "cuda:simulated"):
        self.capacity, self._capability, self.other_bytes, self.name = capacity, capability, other_bytes, name
        self.scale = scale
        self.allocator = CachingAllocator(lambda: self.capacity - self.other_bytes, name, capacity)
        self._sizes: dict[int, int] = {}  # live storage key -> bytes charged
        self._on_device: set[int] = set()  # storage keys that count as device memory for fake_nccl
        self._pending: list[int] = []  # frees that arrived while the allocator was busy (a finalizer in a GC)
        self._busy = False
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> SimulatedCuda:
        with contextlib.ExitStack() as stack:
            stack.enter_context(simulated_device(self))
            stack.enter_context(_Charger(self))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        stack, self._stack = self._stack, None
        stack.__exit__(*exc)

    # memory accounting
    def charge(self, storage: torch.UntypedStorage) -> None:
        """Give `storage` a block (once; again after a resize); may raise torch.OutOfMemoryError."""
        key, nbytes = storage._cdata, storage.nbytes() * self.scale
        known = self._sizes.get(key)
        if known == nbytes:
            return
        with self._allocating():
            if known is not None:
                self.allocator.free(key)
                del self._sizes[key]
            if nbytes > 0:
                self.allocator.malloc(key, nbytes)
                self._sizes[key] = nbytes
        if known is None and nbytes > 0:
            weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self._pending.append(key)
        if not self._busy:  # else a garbage collection ran this finalizer inside the allocator: freed after it
            with self._allocating():
                pass

    @contextlib.contextmanager
    def _allocating(self) -> Iterator[None]:
        """Keeps finalizers out of the allocator's bookkeeping while it runs; frees what they left on the way out."""
        self._busy = True
        try:
            yield
        finally:
            try:
                while self._pending:
                    key = self._pending.pop()
                    self._on_device.discard(key)
                    if self._sizes.pop(key, None) is not None:
                        self.allocator.free(key)
            finally:
                self._busy = False

    def mark(self, tensor: torch.Tensor) -> None:
        self._on_device.add(tensor.untyped_storage()._cdata)

    def on_device(self, tensor: torch.Tensor) -> bool:
        """Whether NCCL would take `tensor`: it came from collective() or from an op on such a tensor."""
        return tensor.untyped_storage()._cdata in self._on_device

    # DeviceOps
    def synchronize(self) -> None:
        """Nothing is queued: every op ran when it was called."""

    def empty_cache(self) -> None:
        with self._allocating():
            self.allocator.empty_cache()

    def reset_peak(self) -> None:
        self.allocator.peak = self.allocator.reserved

    def peak_reserved(self) -> int:
        return self.allocator.peak

    def reserved(self) -> int:
        return self.allocator.reserved

    def allocated(self) -> int:
        """Bytes of the blocks live storages hold (torch.cuda.memory_allocated)."""
        return self.allocator.allocated

    def mem_get_info(self) -> tuple[int, int]:
        return self.capacity - self.other_bytes - self.allocator.reserved, self.capacity

    def capability(self) -> tuple[int, int]:
        return self._capability

    def collective(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of `tensor` charged to and marked as on this device (like tensor.to('cuda'))."""
        copy = tensor.clone()
        self.charge(copy.untyped_storage())
        self.mark(copy)
        return copy


NCCL_CPU_ERROR = "No backend type associated with device type cpu"


@contextlib.contextmanager
def fake_nccl(device: SimulatedCuda) -> Iterator[None]:
    """Within the block, torch.distributed's all_reduce, all_gather and broadcast raise NCCL's error for a tensor
    that is not on `device` (see SimulatedCuda.on_device), and otherwise run on the real (gloo) group."""
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather", "broadcast")}

    def refusing_host_tensors(collective):
        @functools.wraps(collective)
        def call(*args, **kwargs):
            if not all(device.on_device(t) for t in _tensors((args, kwargs), [])):
                raise RuntimeError(NCCL_CPU_ERROR)
            return collective(*args, **kwargs)

        return call

    try:
        for name, collective in originals.items():
            setattr(dist, name, refusing_host_tensors(collective))
        yield
    finally:
        for name, collective in originals.items():
            setattr(dist, name, collective)
