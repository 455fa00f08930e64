"""Ctrl-C and SIGTERM in the main process of a run.

While workers run, an interrupt only raises a flag that the supervisor acts on between messages
(Interrupts); a worker is started with the interrupts blocked (interrupts_blocked), so that a
Ctrl-C during its start-up does not print a traceback per worker.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Callable, Iterator

from .worker import INTERRUPTS


class Interrupts:
    """SIGINT and SIGTERM while the workers run: counted in ``seen``, acted on between messages
    (an exception in the middle of reading a worker's message would leave its pipe half-read).
    Each one cancels the evaluation under way; a second SIGINT calls ``kill`` (every worker)
    and leaves at once."""

    def __init__(self, kill: Callable[[], None]) -> None:
        self.seen = 0
        self.kill = kill
        self.cancel: threading.Event | None = None  # the evaluations', once there are any
        self.handlers: dict[int, Any] = {}

    def catch(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self.handlers = {sig: signal.signal(sig, self.on_signal) for sig in INTERRUPTS}

    def on_signal(self, signum: int, frame: Any) -> None:
        self.seen += 1
        if self.cancel is not None:
            self.cancel.set()  # an evaluation under way stops at its next batch
        if self.seen > 1 and signum == signal.SIGINT:
            self.kill()
            raise KeyboardInterrupt

    def restore(self) -> None:
        for sig, handler in self.handlers.items():
            signal.signal(sig, handler)
        self.handlers = {}


@contextlib.contextmanager
def interrupts_blocked() -> Iterator[None]:
    """Ctrl-C reaches the whole process group, also a worker still importing torch, before
    run_worker can ignore it (a KeyboardInterrupt traceback per worker). A worker is started
    with the interrupts blocked, a mask that survives exec, and unblocks them once it ignores
    them; here they only wait (pending) until the start returns, then are handled as ever."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    # multiprocessing starts its resource tracker at the first start, and unblocks SIGINT and
    # SIGTERM after it (SIG_UNBLOCK, whatever was blocked before): start it first.
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    before = signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
