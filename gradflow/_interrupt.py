"""Ctrl-C as a request to stop at the next safe point, not an exception in the middle of a write.

Written by hand: Python's default SIGINT handler raises KeyboardInterrupt wherever the main
thread happens to be (inside an orbax write, between a metrics line and its checkpoint, or in
XLA's compiler). Long loops (`train.fit`, `atlas.run`) instead poll `requested` at points where
everything finished so far is on disk. A second Ctrl-C raises KeyboardInterrupt at once, as usual.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Interrupt:
    """Set by the first Ctrl-C inside `deferred_interrupt`."""

    requested: bool = False


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[Interrupt]:
    """Within the block, the first SIGINT sets `.requested`; the second raises KeyboardInterrupt.

    Outside the main thread (where Python cannot install signal handlers) it changes nothing.
    """
    flag = Interrupt()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        # None: the previous handler was not installed from Python (an embedding host)
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
