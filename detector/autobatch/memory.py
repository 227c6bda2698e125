"""Readers of a training step's peak memory, for AutoBatch: CUDA's caching allocator, or a CPU tensor tracker.

A probe answers four questions: how much memory has the step needed at most since `reset()` (bytes),
how much this process could use at all (bytes), whether an exception means "out of memory", and how
to leave the device clean after one. Memory is counted in bytes everywhere; logs use GiB (2**30).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import weakref
from collections.abc import Iterator
from typing import Any, Protocol

import psutil
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from detector.device import DeviceOps, device_ops

logger = logging.getLogger(__name__)


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` means an allocation failed (CUDA, cuBLAS/cuDNN workspaces, or the CPU allocator)."""
    if isinstance(err, torch.OutOfMemoryError | MemoryError):
        return True
    # cuBLAS/cuDNN report a failed workspace allocation, and the CPU allocator a failed malloc, as
    # RuntimeErrors of their own.
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(
        words in text for words in ("out of memory", "alloc_failed", "not enough memory", "can't allocate memory"))


class MemoryProbe(Protocol):
    """What AutoBatch needs from a device: reset, watch a step, read its peak, capacity, OOM test."""

    name: str

    def reset(self) -> None:
        """Free cached memory and start a new peak from what is live now."""

    def watch(self) -> contextlib.AbstractContextManager[None]:
        """Context in which a measured step runs (the CPU tracker counts only inside it)."""

    def peak(self) -> int:
        """Most bytes in use since the last `reset()`, including what was already live then."""

    def capacity(self) -> int:
        """Bytes this process can use in all: what is free plus what the probe already counts as in use."""

    def is_oom(self, err: BaseException) -> bool:
        """Whether `err` means the step ran out of memory (and a smaller batch may fit)."""

    def cleanup(self) -> None:
        """Release what a failed step left behind (call after its exception has been dropped)."""


class CudaMemory:
    """Peak memory of one CUDA device as the caching allocator sees it.

    The peak is `max_memory_reserved`, not `max_memory_allocated`: the allocator keeps freed blocks
    reserved and fragmentation makes reserved exceed allocated, and the reserved bytes are what another
    allocation can fail against.
    """

    def __init__(self, ops: DeviceOps):
        if ops.kind != "cuda":
            raise ValueError(f"CudaMemory needs a CUDA device, got {ops.name}")
        self.ops, self.name = ops, ops.name

    def reset(self) -> None:
        self.cleanup()
        self.ops.reset_peak()

    def watch(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def peak(self) -> int:
        self.ops.synchronize()
        return self.ops.peak_reserved()

    def capacity(self) -> int:
        """Free device memory plus what this process's allocator already holds, each byte counted once.

        `mem_get_info` reports free bytes of the whole device, so other processes and this process's
        CUDA context (neither of which the allocator can use) are already taken out. The bytes our
        allocator has reserved are not free, yet they are ours and appear again in the measured peak
        (`max_memory_reserved` starts from them), so they are added back exactly once. Call after
        `reset()` so that cached-but-unused blocks have been returned and are counted as free.
        """
        free, _total = self.ops.mem_get_info()
        return free + self.ops.reserved()

    def is_oom(self, err: BaseException) -> bool:
        return is_out_of_memory(err)

    def cleanup(self) -> None:
        # Frames of a failed step can sit in reference cycles; collect them before returning blocks.
        gc.collect()
        self.ops.synchronize()
        self.ops.empty_cache()


class _StorageCounter(TorchDispatchMode):
    """Counts the bytes of every live tensor storage that an op reads or writes.

    Each storage is registered once, keyed by its C++ address while it lives, and taken out of the
    running total by a weakref finalizer when it is freed. Inputs are registered too, so tensors made
    before the step (parameters, optimizer state, the EMA copy) count from the first op that touches
    them; after a warm-up step they are all registered and are part of the total at every reset.
    """

    def __init__(self, on_change: Any):
        super().__init__()
        self.live: dict[int, int] = {}
        self.on_change = on_change

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten((out, args, kwargs))[0]:
            if isinstance(value, torch.Tensor) and value.layout == torch.strided and value.device.type == "cpu":
                self._register(value.untyped_storage())
        return out

    def _register(self, storage: torch.UntypedStorage) -> None:
        key, nbytes = storage._cdata, storage.nbytes()
        known = self.live.get(key)
        if known == nbytes:
            return
        if known is None:
            weakref.finalize(storage, self._free, key)
        self.live[key] = nbytes  # a resize_ changes the bytes of a known storage
        self.on_change(nbytes - (known or 0))

    def _free(self, key: int) -> None:
        nbytes = self.live.pop(key, 0)
        self.on_change(-nbytes)


class CpuTensorMemory:
    """Peak bytes of live CPU tensor storages during a step, read with a dispatch-mode tracker.

    RSS is too noisy for a fit (the allocator keeps and returns pages on its own schedule), and
    torch's MemTracker raises on models with frozen parameters, hence this small tracker. It counts
    tensor storage bytes only: the allocator's own overhead and Python objects are not included.
    """

    name = "cpu"

    def __init__(self) -> None:
        self.current = 0
        self._peak = 0
        self._counter = _StorageCounter(self._change)

    def _change(self, delta: int) -> None:
        self.current += delta
        self._peak = max(self._peak, self.current)

    def reset(self) -> None:
        self.cleanup()
        self._peak = self.current

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        with self._counter:
            yield

    def peak(self) -> int:
        return self._peak

    def capacity(self) -> int:
        """Available RAM plus the tracked bytes that are live now (already resident, so not available)."""
        return int(psutil.virtual_memory().available + self.current)

    def is_oom(self, err: BaseException) -> bool:
        return is_out_of_memory(err)

    def cleanup(self) -> None:
        gc.collect()


def probe_for(device: torch.device | str) -> MemoryProbe:
    """The memory probe for a training device: CUDA's allocator on GPUs, the tensor tracker on CPU.

    Raises:
        ValueError: for device types AutoBatch cannot measure (e.g. mps).
    """
    device = torch.device(device)
    ops = device_ops(device)
    if ops.kind == "cuda":
        return CudaMemory(ops)
    if device.type == "cpu":
        return CpuTensorMemory()
    raise ValueError(f"AutoBatch cannot measure memory on {device.type} devices; give a fixed batch=N")
