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

    A CPU training step allocates and frees about a gigabyte of activations. By default each large block
    is a fresh mmap whose pages fault in on first touch: about 15,000 page faults per step of the nano
    model at imgsz 320, batch 16, against 1,300 with freed memory kept, and the system CPU time to serve
    them (benchmarks/step_parts.py prints both: 53 against 7 ms of system CPU per step). The step's wall
    time moved by -3% to +2% in side-by-side runs, within this machine's noise. Inference's batched
    forwards allocate the same way, hence here with the threads. The freed pages stay mapped, so the
    process keeps its peak memory until it exits.

    A forked child shares the parent's pages copy-on-write; every page the parent then writes again (each
    step rewrites its activations) is copied for the parent, and the child is left holding the old one. A
    validation loader's worker forked after three training steps so held a private copy of the kept heap:
    998 MiB at imgsz 320, 79 MiB with the free memory released before the fork.
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
    On a 2-core AVX512-BF16 CPU, a training step of the nano model at batch 16 and imgsz 320 took 512 ms
    against 839 ms in float32, and mAP on the shapes set stayed within the spread of seeds
    (docs/performance.md).
    """
    if not amp:
        return None
    if device.type == "cuda":
        # is_bf16_supported() also counts emulation and looks at the current device, not this one.
        major, _minor = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
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
    if device.type == "cuda":
        return f"{torch.cuda.memory_reserved(device) / 2**30:.2f}G"
    return f"{psutil.Process().memory_info().rss / 2**30:.2f}G"

