"""Run folders, logging to console + file, device, thread and host memory choices."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from detector.atomic import file_in_the_way
from detector.distributed import physical_core_share
from detector.errors import ConfigError

logger = logging.getLogger("detector")


def make_run_dir(project: str, name: str, exist_ok: bool) -> Path:
    """project/name, or project/name2, name3, ... so an earlier run is never overwritten.

    Raises:
        ConfigError: a file sits where project, one of its parents or (with exist_ok) project/name should be.
    """
    base = Path(project) / name
    blocker = file_in_the_way(base if exist_ok else base.parent)  # without exist_ok a file at base means name2
    if blocker == base:
        raise ConfigError(f"run folder {base} is a file, not a folder: pick another name= or project=")
    if blocker == Path(project):
        raise ConfigError(f"project={project} is a file, not a folder: give project= a folder for the runs")
    if blocker is not None:
        raise ConfigError(f"project={project} lies inside {blocker}, which is a file, not a folder: "
                          "give project= a folder for the runs")
    if exist_ok:
        base.mkdir(parents=True, exist_ok=True)
        return base
    for index in range(1, 10_000):
        candidate = base if index == 1 else base.with_name(f"{name}{index}")
        try:
            candidate.mkdir(parents=True)  # fails if it exists, so two runs started at once never share one
            return candidate
        except FileExistsError:
            continue
    raise ConfigError(f"too many run folders named {base}*: pick another name=")


def setup_logging(log_file: Path | None = None, verbose: bool = True) -> None:
    """Console (INFO) and, for a run, the run folder's train.log; safe to call more than once."""
    root = logging.getLogger("detector")
    root.setLevel(logging.INFO)
    root.propagate = False
    if not any(getattr(h, "_detector_console", False) for h in root.handlers):
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter("%(message)s"))
        console._detector_console = True
        root.addHandler(console)
    for handler in root.handlers:
        if getattr(handler, "_detector_console", False):
            handler.setLevel(logging.INFO if verbose else logging.WARNING)
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()
    if log_file is not None:
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(file_handler)


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


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Python's cyclic garbage collector off for a block that makes tens of thousands of acyclic objects (the COCO
    dicts of a validation pass and its evaluation), so that collections, which walk every object of a training
    process, do not land inside it; reference counting still frees everything. coco128's validation pass at 320
    with 300,000 other objects alive: 1.41 s paused against 1.69 running, medians of 7 (benchmarks/eval_speed.py)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


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
