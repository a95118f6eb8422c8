"""Tokenization off the event loop, in a bounded pool.

Short texts are tokenized inline (microseconds). Longer ones go to a few threads, through the
tokenizer's GIL-releasing entry point, so one long prompt cannot stall the streams of everyone else;
at most ``max_queued`` of them wait for a thread, and beyond that a request is refused at once
(``TokenizerBusy``, RESOURCE_EXHAUSTED at the gateway) instead of piling up memory and latency.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from scheduler_svc.gateway.tokenizer import Tokenizer

INLINE_CHARS = 4096  # tokenized on the event loop: well under a millisecond
RETRY_AFTER_S = 0.5  # the hint sent with TokenizerBusy: a queue of long texts drains in about that long


class TokenizerBusy(RuntimeError):
    """Every tokenizer thread is taken and the queue in front of them is full."""


class TokenizerPool:
    def __init__(self, tokenizer: Tokenizer, num_threads: int = 2, max_queued: int = 64) -> None:
        self.tokenizer = tokenizer
        self.max_in_pool = num_threads + max_queued  # running plus waiting
        self.num_in_pool = 0
        self._executor = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="tokenize")

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The token ids of ``text``; raises TokenizerBusy when the pool is full."""
        if len(text) <= INLINE_CHARS:
            return self.tokenizer.encode(text, add_special_tokens)
        if self.num_in_pool >= self.max_in_pool:
            raise TokenizerBusy(f"the gateway is busy tokenizing {self.num_in_pool} long texts; retry later")
        # Counted until the thread is done with it, not until the caller stops waiting: a cancelled
        # request's text still occupies its thread. Only the event loop's thread counts: no lock.
        loop = asyncio.get_running_loop()
        job = self._executor.submit(self.tokenizer.encode_releasing_gil, text, add_special_tokens)
        self.num_in_pool += 1
        job.add_done_callback(lambda _: self._release_from(loop))
        return await asyncio.wrap_future(job)  # cancelled: a job that has not started is dropped

    def _release_from(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            loop.call_soon_threadsafe(self._release)
        except RuntimeError:  # the loop has closed (shutdown): nobody counts any more
            pass

    def _release(self) -> None:
        self.num_in_pool -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
