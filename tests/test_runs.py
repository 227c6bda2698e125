"""Process settings of a run: the device a spelling names, freed host memory kept by malloc for reuse, and the
files a run writes."""

import os
import re
import stat
import subprocess
import sys

import pytest

HELD_AFTER_FREE = """
import ctypes, sys, torch
from detector.device import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
block = torch.ones(64 * 2**20 // 4)  # 64 MiB written then freed, like one activation of a training step
mapped = libc.mallinfo2().hblkhd
del block
print(kept, mapped, libc.mallinfo2().fordblks)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_activations_stay_with_malloc_for_the_next_step():
    def run(mode: str) -> tuple[str, int, int]:
        out = subprocess.run([sys.executable, "-c", HELD_AFTER_FREE, mode], capture_output=True, text=True,
                             check=True)
        kept, mapped, free_held = out.stdout.split()
        return kept, int(mapped), int(free_held)

    block = 64 * 2**20
    kept, mapped, free_held = run("default")
    # By default the block is its own mmap, unmapped on free: its pages fault in again at the next step.
    assert kept == "False" and mapped >= block and free_held < block
    kept, mapped, free_held = run("keep")
    # Kept: the block comes from malloc's heap and stays there, free for the next allocation.
    assert kept == "True" and mapped < block and free_held >= block


WORKER_AFTER_FREE = """
import ctypes, sys, psutil, torch
from torch.utils.data import DataLoader
from detector.device import keep_freed_memory

if sys.argv[1] == "release":
    keep_freed_memory()
else:  # the same malloc settings without keep_freed_memory's release before a fork
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-4, 0)
    libc.mallopt(-1, 2**31 - 1)
block = torch.ones(64 * 2**20)  # 256 MiB of activations, freed: malloc keeps them
del block
batches = iter(DataLoader(range(4), num_workers=1, persistent_workers=True))
next(batches)  # the worker is forked
blocks = [torch.ones(12 * 2**20) for _ in range(4)]  # the next step's activations: 192 MiB of the kept memory
print(psutil.Process().children()[0].memory_full_info().uss)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_a_worker_forked_late_holds_no_copy_of_the_memory_malloc_kept():
    def worker_private_mib(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", WORKER_AFTER_FREE, mode], capture_output=True, text=True,
                             check=True)
        return int(out.stdout.split()[-1]) / 2**20

    pinned, released = worker_private_mib("plain"), worker_private_mib("release")
    # Without the release, the worker keeps the old copy of every kept page the parent wrote again.
    assert pinned > 150
    assert released < pinned - 120


def test_device_spellings_resolve_to_one_gpu_or_fail_in_one_line(monkeypatch):
    import torch

    from detector.device import select_device
    from detector.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert select_device("") == torch.device("cpu")
    assert select_device(" CPU ") == torch.device("cpu")
    for spec in ("cuda", "0", "cuda:0"):
        with pytest.raises(ConfigError, match="asked for a GPU, but torch sees 0"):
            select_device(spec)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert select_device("") == torch.device("cuda:0")
    assert select_device("cuda") == torch.device("cuda:0")
    assert select_device("1") == torch.device("cuda:1")
    assert select_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match="torch sees 2"):
        select_device("2")
    with pytest.raises(ConfigError, match="invalid value device='gpu'"):
        select_device("gpu")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
@pytest.mark.parametrize(("umask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)], ids=oct)
def test_atomic_writes_get_the_mode_open_gives(umask, expected, tmp_path):
    from detector.atomic import atomic_write_text

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "args.yaml", "epochs: 1\n")
        (tmp_path / "train.log").write_text("plain open()\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "args.yaml").stat().st_mode) == expected
    assert stat.S_IMODE((tmp_path / "train.log").stat().st_mode) == expected
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_file_where_a_run_folder_should_be_is_one_config_error_naming_it(tmp_path):
    from detector.errors import ConfigError
    from detector.runs import make_run_dir

    notes = tmp_path / "notes.txt"
    notes.write_text("not a folder")
    with pytest.raises(ConfigError, match=f"^project={re.escape(str(notes))} is a file, not a folder: "):
        make_run_dir(str(notes), "train", False)
    with pytest.raises(ConfigError, match=f"^project={re.escape(str(notes / 'runs'))} lies inside "
                                          f"{re.escape(str(notes))}, which is a file, not a folder: "):
        make_run_dir(str(notes / "runs"), "train", True)
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "train").write_text("a file named like the run")
    with pytest.raises(ConfigError, match=f"^run folder {re.escape(str(runs / 'train'))} is a file, not a folder"):
        make_run_dir(str(runs), "train", True)
    assert make_run_dir(str(runs), "train", False) == runs / "train2"  # without exist_ok the next name is taken


def test_atomic_write_over_a_folder_or_inside_a_file_names_the_path(tmp_path):
    from detector.atomic import atomic_write_text
    from detector.errors import DetectorError

    folder = tmp_path / "out.json"
    folder.mkdir()
    with pytest.raises(DetectorError, match=f"^cannot write {re.escape(str(folder))}: it is a folder; "):
        atomic_write_text(folder, "{}")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a folder")
    with pytest.raises(DetectorError, match=f"^cannot write {re.escape(str(notes / 'sub' / 'out.json'))}: "
                                            f"{re.escape(str(notes))} is a file, not a folder; "):
        atomic_write_text(notes / "sub" / "out.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "out.json"] and not any(folder.iterdir())


@pytest.fixture
def package_logger():
    """The package's logger, its handlers and settings put back after the test."""
    import logging

    logger = logging.getLogger("detector")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield logger
    for handler in logger.handlers:
        if handler not in saved[0]:
            handler.close()
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


def test_a_run_logs_to_its_train_log_until_an_entry_point_sets_logging_up_again(tmp_path, package_logger):
    import logging

    from detector.runs import log_run, setup_logging

    log_run(tmp_path / "train.log", verbose=False)  # a rank other than 0 would pass None
    console = [h for h in package_logger.handlers if getattr(h, "_detector_console", False)]
    assert len(console) == 1 and console[0].level == logging.WARNING  # the file still gets INFO
    logging.getLogger("detector.example").info("during the run")
    setup_logging()  # e.g. Model.val after Model.train
    logging.getLogger("detector.example").info("after the run")
    assert console[0].level == logging.INFO
    assert [h for h in package_logger.handlers if getattr(h, "_detector_console", False)] == console  # still one
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert len(lines) == 1 and lines[0].endswith("INFO detector.example: during the run")
