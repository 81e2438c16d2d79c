"""Ctrl-C and SIGTERM during a run: stop cleanly after the current step.

The first SIGINT (Ctrl-C) or SIGTERM only records itself; the training loop sees it after
the step it is in, writes ``checkpoints/last.pt`` of that step and ``summary.json`` and
returns (:mod:`pdml.training.run`). A second one raises :class:`KeyboardInterrupt` at once:
every file the run writes is written atomically (:mod:`pdml.training.checkpoint`), so
stopping anywhere leaves each file whole, old or new.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_status(signum: int) -> int:
    """The shell's exit status of a process stopped by ``signum``: 128 + its number
    (Ctrl-C 130, SIGTERM 143)."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    """``"SIGINT"``, ``"SIGTERM"``, ... of a signal number."""
    return signal.Signals(signum).name


class StopRequest:
    """``with StopRequest() as stop:`` -- ``stop.signum`` is the first stop signal received
    inside the block (None while there is none); a second one raises KeyboardInterrupt.

    Handlers can only be installed from the main thread; elsewhere the block installs
    nothing and the signals keep their previous handlers. The previous handlers come back
    when the block ends.
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal_name(signum)}: stopping at once")
        self.signum = signum

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
