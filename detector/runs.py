"""Run folders and logging to the console and a run's train.log."""

from __future__ import annotations

import logging
from pathlib import Path

from detector.atomic import file_in_the_way
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


def setup_logging(verbose: bool = True) -> None:
    """The package's log on the console (INFO; warnings only unless `verbose`) and in no run's train.log.

    Called once by each entry point (cli.main, the Model methods that train or validate); safe to call again.
    """
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


def log_run(log_file: Path | None, verbose: bool = True) -> None:
    """A training run's log: the console as setup_logging sets it, and `log_file` (the run's train.log; None:
    no file, as on the ranks other than 0) in place of an earlier run's."""
    setup_logging(verbose)
    if log_file is not None:
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("detector").addHandler(file_handler)
