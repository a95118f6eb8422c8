"""A launched process ends with its launcher: every role (scheduler, worker, gateway) takes
``--exit-with-parent``, which the launchers (``pagedserve serve``, ``LLM``) always pass.

Stdlib only and at the bottom of the house, like engine_args, so that every role can import it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import faulthandler
import os
import select
import signal

PR_SET_PDEATHSIG = 1


def add_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--exit-with-parent", action="store_true",
                        help="exit when the launching process dies (the launchers pass it)")


def exit_with_parent() -> None:
    """Asks Linux to SIGTERM this process when its parent exits (every role stops cleanly on SIGTERM).
    Where prctl is missing (not Linux) the process outlives its launcher, as it would without the flag."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def dump_stacks_on_sigusr1() -> None:
    """``kill -USR1 PID`` prints every thread's Python stack to the process's stderr (its log file under
    ``--log-dir``) and the process goes on: how to see where a stuck process is. It is written from the
    C signal handler, so it works even when the main thread is blocked or deadlocked."""
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)


class StopSignals:
    """SIGINT and SIGTERM for a supervising loop: ``count`` says how many arrived, ``wait(t)`` sleeps up to
    ``t`` seconds or until the next one.

    The handler takes no lock: it counts and writes a byte to a pipe that ``wait`` selects on. A handler
    that calls ``threading.Event.set()`` deadlocks when the signal lands while the main thread is inside
    ``Event.wait()`` on that same event (Python runs handlers in the main thread, between bytecodes, and
    the event's lock is not reentrant): the launcher then hung on a SIGTERM until it was killed."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self.count = 0
        self._read, self._write = os.pipe()
        for fd in (self._read, self._write):
            os.set_blocking(fd, False)
        for sig in signals:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, *_: object) -> None:
        self.count += 1
        with contextlib.suppress(BlockingIOError):  # a full pipe already wakes the waiter
            os.write(self._write, b"\0")

    def wait(self, timeout_s: float) -> int:
        """Returns once a signal arrives (or one arrived since the last wait) or after ``timeout_s``; the
        count so far."""
        ready, _, _ = select.select([self._read], [], [], timeout_s)
        if ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._read, 512):
                    pass
        return self.count

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)
