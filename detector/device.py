"""The training device and the host: which device, how many threads, AMP dtype, moving images onto it.

The lowest layer of the package next to config: data, model, inference and training all read it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys

import psutil
import torch

from detector.errors import ConfigError


def cpu_share() -> int:
    """CPU cores for this process: the machine's logical cores split between the ranks on it."""
    return max((os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1)


def physical_core_share() -> int:
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return max(cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1)


def select_device(spec: str) -> torch.device:
    """'' -> cuda:0 when available else cpu; 'cpu'; '0', 'cuda:0' or 'cuda' (GPU 0) -> that GPU (an error if
    absent)."""
    spec = spec.strip().lower()
    if spec in ("", "auto"):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    index = "0" if spec == "cuda" else spec.removeprefix("cuda:")
    if not index.isdigit():
        raise ConfigError(f"invalid value device={spec!r}: expected '', cpu, cuda, a GPU index like 0, or cuda:0")
    if not torch.cuda.is_available() or int(index) >= torch.cuda.device_count():
        raise ConfigError(f"device={spec} asked for a GPU, but torch sees {torch.cuda.device_count()} "
                          "CUDA device(s): use device=cpu or check the CUDA install")
    return torch.device(f"cuda:{index}")


def set_threads(threads: int) -> int:
    """Torch intra-op threads: one per physical core (of this rank's share under DDP) by default, since
    SMT siblings slow convolutions. Also keeps freed host memory for reuse (keep_freed_memory)."""
    count = threads or physical_core_share()
    torch.set_num_threads(count)
    keep_freed_memory()
    return count


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for the next allocation instead of handing it back to the OS,
    and hand it back just before this process forks (a loader worker, say).

    A CPU step allocates and frees about a gigabyte of activations; each large block would otherwise be a fresh
    mmap whose pages fault in on first touch, every step. Released before a fork, so a loader worker does not
    keep a private copy-on-write copy of the kept heap. The figures are in docs/performance.md
    (benchmarks/step_parts.py).
    Returns False where there is no glibc (macOS, Windows, musl), which changes nothing.
    """
    global _release_at_fork
    libc = _glibc()
    if libc is None:
        return False
    if not _release_at_fork:
        os.register_at_fork(before=lambda: libc.malloc_trim(0))
        _release_at_fork = True
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameters of <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


_release_at_fork = False  # keep_freed_memory's fork hook is registered (it cannot be removed, so only once)


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def amp_dtype_for(amp: bool, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of training and validation; None (full precision) where amp=false or none pays.

    CUDA: bf16 where the device computes it (capability 8.0+: Ampere and later), else fp16 with
    GradScaler. CPU: bf16 where the CPU computes in it natively
    (x86 AVX512-BF16 or AMX); float32 on other CPUs, which would emulate bf16 or were not measured (ARM).
    The speed and accuracy figures are in docs/performance.md.
    """
    if not amp:
        return None
    ops = device_ops(device)
    if ops.kind == "cuda":
        # Not torch.cuda.is_bf16_supported(): it also counts emulation, and asks the current device, not this one.
        return torch.bfloat16 if ops.capability() >= (8, 0) else torch.float16
    if device.type != "cpu":
        return None
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()  # a torch without it cannot tell: float32
    return torch.bfloat16 if capabilities.get("avx512_bf16") or capabilities.get("amx_bf16") else None


def prepare_images(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, H, W) in [0, 1] on device; the conversion runs after the copy.

    One pass converts the dtype and sets the memory format (channels_last or contiguous) whatever the
    strides of `images` (a loader's batch is NHWC in memory).
    """
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return images.to(device, non_blocking=True).to(torch.float32, memory_format=memory_format).div_(255)


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def memory_text(device: torch.device) -> str:
    """Memory the process holds on `device`, for progress bars: reserved by the allocator (CUDA) or resident (CPU)."""
    return f"{device_ops(device).reserved() / 2**30:.2f}G"



class DeviceOps:
    """The runtime calls of one device beyond placing tensors, chosen once from the device (`device_ops`).

    The stages ask this object, never `torch.cuda` or `device.type == "cuda"`, so a test can hand in a simulated
    CUDA device that keeps its tensors on the CPU (tests/cuda_sim.py). This class is the CPU's answers: nothing
    to wait for or to release, host memory, no capability.
    """

    kind = "cpu"
    name = "cpu"

    def synchronize(self) -> None:
        """Wait for the device's queued work (a step's time and peak are read after it)."""

    def empty_cache(self) -> None:
        """Hand cached blocks back to the device."""

    def reset_peak(self) -> None:
        """Start a new peak of reserved memory from what is reserved now."""

    def peak_reserved(self) -> int:
        return self.reserved()

    def reserved(self) -> int:
        """Bytes the process holds on the device (the host's resident set, on a CPU)."""
        return int(psutil.Process().memory_info().rss)

    def mem_get_info(self) -> tuple[int, int]:
        """(free, total) bytes of the whole device."""
        memory = psutil.virtual_memory()
        return int(memory.available), int(memory.total)

    def capability(self) -> tuple[int, int]:
        return (0, 0)

    def collective(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` where this device's process group takes it (NCCL refuses host tensors)."""
        return tensor


class CudaOps(DeviceOps):
    """One CUDA device, as torch.cuda and its caching allocator report it."""

    kind = "cuda"

    def __init__(self, device: torch.device):
        self.device = device
        self.name = f"cuda:{torch.cuda.get_device_name(device)}"

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_reserved(self) -> int:
        return int(torch.cuda.max_memory_reserved(self.device))

    def reserved(self) -> int:
        return int(torch.cuda.memory_reserved(self.device))

    def mem_get_info(self) -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info(self.device)
        return int(free), int(total)

    def capability(self) -> tuple[int, int]:
        return tuple(torch.cuda.get_device_capability(self.device))

    def collective(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device)


_simulated: DeviceOps | None = None  # a test's simulated device, answering for the CPU device


def device_ops(device: torch.device | str) -> DeviceOps:
    """The runtime calls of `device`: CUDA's for a GPU, the CPU's, or a simulated device installed by a test."""
    device = torch.device(device)
    if device.type == "cuda":
        return CudaOps(device)
    if device.type == "cpu" and _simulated is not None:
        return _simulated
    return DeviceOps()


@contextlib.contextmanager
def simulated_device(ops: DeviceOps):
    """Within the block, the CPU device answers as `ops` (a CUDA stand-in whose tensors stay on the CPU)."""
    global _simulated
    previous, _simulated = _simulated, ops
    try:
        yield ops
    finally:
        _simulated = previous
