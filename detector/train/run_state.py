"""What a run's checkpoints hold, how a run saves them each epoch, and how a resumed run takes them back.

last.pt (and epoch<N>.pt with save_period) hold everything a resumed run needs to continue batch for batch;
best.pt holds what inference needs.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from detector.train.checkpoint import pending_gradients, restore_gradients, rng_state, save_checkpoint, set_rng_state
from detector.train.engine import LoopState, StepContext

# What only resuming needs, left out of best.pt.
RESUME_ONLY = ("raw_model", "optimizer", "scaler", "rng", "grads")


def training_state(ctx: StepContext, model: nn.Module, *, epoch: int, best_fitness: float, rows: list[dict],
                   about: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of the run after `epoch` (0-based) as plain data.

    Args:
        ctx: the optimizer, scaler, EMA and loop counters.
        model: the raw (not DDP-wrapped) model.
        epoch: the epoch just done; the checkpoint says epoch + 1 epochs are.
        best_fitness: the best validation fitness so far.
        rows: results.csv's rows so far.
        about: what stays the same in every save: config, plan, model_args, names, category_ids.
    """
    ema = ctx.ema
    return {
        "epoch": epoch + 1,
        "model": (ema.module if ema is not None else model).state_dict(),
        "raw_model": model.state_dict(),
        "ema_updates": ema.updates if ema is not None else 0,
        "optimizer": ctx.optimizer.state_dict(),
        "scaler": ctx.scaler.state_dict(),
        "loop": asdict(ctx.state),
        "best_fitness": best_fitness,
        "rows": rows,
        "rng": rng_state(),
        "grads": pending_gradients(model),
        **about,
    }


def save_epoch(weights_dir: Path, state: dict[str, Any], *, save_period: int, improved: bool) -> None:
    """last.pt; epoch<N>.pt every `save_period` epochs (resumable, as last.pt); best.pt when `improved`."""
    save_checkpoint(weights_dir / "last.pt", state)
    if save_period and state["epoch"] % save_period == 0:
        save_checkpoint(weights_dir / f"epoch{state['epoch']}.pt", state)
    if improved:
        save_checkpoint(weights_dir / "best.pt", {k: v for k, v in state.items() if k not in RESUME_ONLY})


def restore_training_state(ctx: StepContext, model: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Put the optimizer, scaler, EMA, loop counters, RNG states and pending gradients back as `checkpoint` holds them.

    The epoch, best fitness and rows are the caller's to take (checkpoint["epoch"], ...).
    """
    ctx.optimizer.load_state_dict(checkpoint["optimizer"])
    ctx.scaler.load_state_dict(checkpoint["scaler"])
    if ctx.ema is not None:
        ctx.ema.module.load_state_dict(checkpoint["model"])
        ctx.ema.updates = checkpoint["ema_updates"]
    ctx.state = LoopState(**checkpoint["loop"])
    set_rng_state(checkpoint["rng"])
    restore_gradients(model, checkpoint.get("grads", {}))
