"""What resume= means: the last.pt to continue from, checked to be resumable, and the settings that may change."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from detector.config import check_values, convert, load_defaults
from detector.errors import ConfigError
from detector.train.checkpoint import load_checkpoint

logger = logging.getLogger(__name__)

# Settings a resumed run takes from the command line; every other one continues as the run was configured.
CHANGEABLE = ("device", "workers", "threads", "epochs", "save_period", "tensorboard")
# Settings that only say where the run is.
LOCATING = ("resume", "project", "name", "exist_ok")


def resume_checkpoint(overrides: dict[str, Any]) -> tuple[dict | None, dict[str, Any], dict[str, Any]]:
    """(checkpoint, its settings, the overrides that apply) for resume=true or resume=<path to last.pt>.

    Without resume: (None, {}, overrides). Overrides that would change a setting other than CHANGEABLE are
    dropped with a warning naming them: a run continues with the data, model, sizes and schedule it began with.

    Raises:
        ConfigError: no last.pt there, a checkpoint without training state (best.pt), or a finished run.
        DetectorError: the file is not a readable checkpoint.
    """
    resume = convert("resume", overrides.get("resume"))  # "" for false, no, 0, None...
    if not resume:
        return None, {}, overrides
    last = find_last_checkpoint(resume, overrides)
    checkpoint = load_checkpoint(last)
    if "optimizer" not in checkpoint or "raw_model" not in checkpoint:
        raise ConfigError(f"{last} holds no training state (best.pt is for inference): resume from the run's "
                          f"weights/last.pt, or start from it with model={last}")
    settings = dict(checkpoint["config"], exist_ok=True, resume=str(last))
    epochs = int(overrides.get("epochs", settings["epochs"]))
    if checkpoint["epoch"] >= epochs and not settings.get("time"):
        raise ConfigError(f"the run of {last} already finished its {checkpoint['epoch']} epochs: give epochs=N "
                          f"with N > {checkpoint['epoch']} to train it longer, or start a new run")
    fixed = {key: value for key, value in overrides.items() if key not in (*CHANGEABLE, *LOCATING)
             and not (key == "model" and str(value).endswith(".pt"))}  # the checkpoint itself, as the API passes it
    requested, defaults = check_values(fixed), load_defaults()
    ignored = {key: fixed[key] for key, value in requested.items()
               if value != convert(key, settings.get(key, defaults[key]))}
    if ignored:
        logger.warning("resume continues the run as it was configured; ignored %s (only %s can change)",
                       " ".join(f"{k}={v}" for k, v in ignored.items()), ", ".join(CHANGEABLE))
    return checkpoint, settings, {k: v for k, v in overrides.items() if k in CHANGEABLE}


def find_last_checkpoint(resume: str, overrides: dict[str, Any]) -> Path:
    """resume=<path>: that file; resume=true: model=<a .pt> when given (Model("last.pt").train(resume=True)),
    else project/name/weights/last.pt."""
    if resume.lower() not in ("true", "1", "yes"):
        return Path(resume)
    if str(overrides.get("model", "")).endswith(".pt"):
        return Path(overrides["model"])
    defaults = load_defaults()
    run = Path(overrides.get("project", defaults["project"])) / str(overrides.get("name", defaults["name"]))
    last = run / "weights" / "last.pt"
    if not last.is_file():
        raise ConfigError(f"resume=true but {last} does not exist: give resume=<path to last.pt>")
    return last
