"""Stopping a run cleanly: the first Ctrl-C (SIGINT) or SIGTERM ends the current batch, saves, then stops.

A second signal stops at once, as Python's default handler would: whatever is on disk is whole
(checkpoints are written atomically), so the run still resumes, from the previous save.
"""

from __future__ import annotations

import logging
import signal
import threading

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """A context manager that turns SIGINT and SIGTERM into a request the training loop polls.

    Inside `with StopRequest() as stop:`, calling `stop()` says whether a signal has arrived. The
    previous handlers come back on exit. Outside the main thread (where Python cannot install
    signal handlers) it installs nothing and `stop()` stays False.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __call__(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal_name is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopped at once")
        self.signal_name = signal.Signals(signum).name
        logger.warning("%s: stopping after this batch and saving weights/last.pt (send it again to stop at once)",
                       self.signal_name)
