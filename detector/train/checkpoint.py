"""Checkpoints as plain data, written atomically and read with torch.load(weights_only=True).

A checkpoint holds state dicts, the resolved config, the model's architecture numbers, class names,
progress counters and RNG states: nothing that needs pickle to run code when it is loaded.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from detector.atomic import atomic_write_bytes
from detector.errors import DetectorError
from detector.model.peer import load_peer_checkpoint


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` (plain containers, numbers, strings and tensors only) atomically."""
    atomic_write_bytes(path, lambda file: torch.save(state, file))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint without running any code from it. An Ultralytics detection checkpoint comes back in this
    package's shape (detector/model/peer.py load_peer_checkpoint).

    Raises:
        DetectorError: the file is missing, is not a checkpoint, or holds objects that would need
            arbitrary code to load (a pickle from an untrusted source, or another trainer's format).
    """
    path = Path(path)
    if path.is_dir():
        raise DetectorError(f"checkpoint {path} is a folder: give a .pt file, e.g. {path / 'weights' / 'last.pt'}")
    if not path.is_file():
        raise DetectorError(f"checkpoint {path} does not exist: check the path (model=n, s or m builds a new model)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = _refused_object(err)
        if refused.startswith("ultralytics."):  # an Ultralytics model: its tensors rebuilt without running its code
            return load_peer_checkpoint(path)
        message = (f"was refused: it holds objects other than plain data{f' ({refused})' if refused else ''}; "
                   "only checkpoints written by this package (or Ultralytics detection checkpoints) load")
        raise DetectorError(f"checkpoint {path} {message}") from err
    except Exception as err:  # torch raises RuntimeError, EOFError, KeyError... for files that are no checkpoint
        reason = "the file is empty" if path.stat().st_size == 0 else _first_sentence(err)
        raise DetectorError(f"checkpoint {path} is not readable ({reason}); is it truncated or not a .pt?") from err
    if not isinstance(state, dict) or "model" not in state or "model_args" not in state:
        raise DetectorError(f"checkpoint {path} is not a detector checkpoint (no model/model_args entries)")
    return state


def _refused_object(err: Exception) -> str:
    """What torch's refusal names (the object, e.g. 'posix.system', or else its 'Unsupported ...' line), without its
    advice to load with weights_only=False; '' when it names nothing."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    if found:
        return found.group(1)
    lines = [line.strip() for line in str(err).splitlines() if line.strip().startswith("Unsupported")]
    return lines[0] if lines else ""


def _first_sentence(err: Exception) -> str:
    """The error's type and first sentence: torch's messages go on with advice for its own developers."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.split('. ')[0].splitlines()[0]}" if text else type(err).__name__


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def pending_gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The gradients accumulated since the last optimizer step (empty right after a step).

    A run saved inside an accumulation window (an epoch whose batches do not divide by the
    accumulation, or a stop mid-epoch) must carry them, or the resumed run's next step would
    average fewer batches than the uninterrupted run's.
    """
    return {name: p.grad.detach() for name, p in model.named_parameters() if p.grad is not None}


def restore_gradients(model: torch.nn.Module, gradients: dict[str, torch.Tensor]) -> None:
    for name, parameter in model.named_parameters():
        if name in gradients:
            parameter.grad = gradients[name].to(parameter.device, parameter.dtype)
