"""Waiting for something to happen by polling a condition, never by sleeping a guessed time.

A fixed sleep is either too short on a loaded machine (a flaky test) or too long everywhere (a slow
one); a poll returns as soon as the condition holds and fails with a message naming what never
happened. Sleeps that are the thing under test (a slow reader, a paced fake) stay sleeps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], timeout_s: float, interval_s: float = 0.01, what: str = "the condition"
) -> T:
    """Polls ``predicate`` until it returns a truthy value and returns that value; raises
    AssertionError naming ``what`` after ``timeout_s``. Every sleep is followed by a poll, so a long
    interval cannot time out on a condition that holds by the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


async def wait_until_async(
    predicate: Callable[[], T], timeout_s: float, interval_s: float = 0.01, what: str = "the condition"
) -> T:
    """wait_until for coroutines: yields to the event loop between polls."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(interval_s)
