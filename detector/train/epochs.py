"""How many epochs a run trains, and which of them use mosaic and mixup."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def mosaic_epochs(epochs: int, close_mosaic: int, log: bool = False) -> int:
    """The epochs at the start of a run of `epochs` that use mosaic and mixup; the rest go without, on whole images as
    validation sees them.

    close_mosaic closes the last close_mosaic epochs, but at most the last third of the run (epochs // 3): a short
    run (epochs <= close_mosaic, where closing them all would leave no mosaic at all) still trains mostly on mosaics.
    With the defaults (30 epochs, close_mosaic=10) the two agree. `log`: say so in the log when the third applies.
    """
    closed = min(close_mosaic, epochs // 3)
    if log and closed < close_mosaic:
        logger.info("close_mosaic=%d is more than a third of %d epochs: mosaic and mixup go off for the last %d "
                    "instead", close_mosaic, epochs, closed)
    return epochs - closed


def refit_epochs(hours: float, *, done: int, start_epoch: int, elapsed: float, epochs: int) -> int:
    """The epochs that fit the time budget of `hours`, `done` epochs and `elapsed` seconds into the run (of which
    the epochs from `start_epoch` ran in this process)."""
    per_epoch = elapsed / max(done - start_epoch, 1)
    remaining = hours * 3600 - elapsed
    fitted = done + max(int(remaining / per_epoch + 0.3), 0)
    if fitted != epochs:
        logger.info("time budget %.2f h: %.1f s per epoch -> %d epochs", hours, per_epoch, fitted)
    return fitted
