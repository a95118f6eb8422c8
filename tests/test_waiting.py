"""The shared wait helpers: return the condition's value as soon as it holds, fail naming what never
happened."""

import asyncio
import itertools
import time

import pytest

from tests.waiting import wait_until, wait_until_async


def test_returns_the_first_truthy_value_without_waiting_longer():
    calls = itertools.count(1)
    start = time.monotonic()
    assert wait_until(lambda: [n] if (n := next(calls)) >= 3 else [], timeout_s=5, interval_s=0.001) == [3]
    assert next(calls) == 4  # polled exactly three times
    assert time.monotonic() - start < 1


def test_times_out_naming_what_never_happened():
    polls = itertools.count()
    with pytest.raises(AssertionError, match=r"timed out after 0\.05 s waiting for the worker's hello"):
        wait_until(lambda: next(polls) < 0, timeout_s=0.05, interval_s=0.01, what="the worker's hello")
    assert next(polls) >= 3  # it polled until the deadline, and once past it


def test_a_condition_that_holds_at_the_deadline_is_not_a_timeout():
    start = time.monotonic()
    # The first poll is false; the sleep outlasts the deadline; the poll after it sees the condition.
    assert wait_until(lambda: time.monotonic() - start > 0.02, timeout_s=0.01, interval_s=0.03) is True


def test_async_variant_yields_to_the_loop_while_waiting():
    async def scenario():
        seen = []

        async def producer():
            for i in range(3):
                await asyncio.sleep(0)
                seen.append(i)

        task = asyncio.create_task(producer())
        assert await wait_until_async(lambda: len(seen) == 3 and list(seen), timeout_s=5) == [0, 1, 2]
        await task
        with pytest.raises(AssertionError, match="waiting for nothing"):
            await wait_until_async(lambda: False, timeout_s=0.02, what="nothing")

    asyncio.run(scenario())
