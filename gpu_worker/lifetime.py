"""A launched process ends with its launcher: every role (scheduler, worker, gateway) takes
``--exit-with-parent``, which the launchers (``pagedserve serve``, ``LLM``) always pass.

Stdlib only and at the bottom of the house, like engine_args, so that every role can import it.
"""

from __future__ import annotations

import argparse
import ctypes
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
