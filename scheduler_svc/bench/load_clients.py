"""Load from several client processes, so that a benchmark measures the server and not its client.

One Python process reading gRPC streams tops out near one core (the serving benchmark's single client
used 1.6 cores at 21k tokens/s on the H200), so ``bench serving`` and ``bench gateway`` spread their
streams over ``ClientPool`` processes (spawned: a forked gRPC runtime is not safe). Each process opens
its own channels, one TCP connection each (a local subchannel pool: by default channels of one process
with the same target share a connection), so that gateways sharing a port with SO_REUSEPORT, which
the kernel balances per connection, each get a share.

The processes report ready after connecting (and after their warm-up requests), then all start at one
instant the parent gives on the CLOCK_MONOTONIC clock (``time.monotonic`` is that clock, the same in
every process), and send back what they measured. They read raw GenerateResponses (the benchmark's
bookkeeping per message is one clock read and a list append), not the client library's dataclasses.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import time
from dataclasses import dataclass, field

CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 * 2**20)]
MAX_CHANNELS = 64  # per process; a channel is one connection
READY_TIMEOUT_S = 900.0  # a GPU service may compile kernels for minutes before it serves


def split(num: int, parts: int) -> list[int]:
    """``num`` as ``parts`` near-equal shares, the larger first."""
    return [num // parts + (i < num % parts) for i in range(parts)]


@dataclass(slots=True)
class Timing:
    """One request as a client saw it (CLOCK_MONOTONIC seconds)."""

    index: int
    start: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def first(self) -> float | None:
        return next((t for t, n in zip(self.chunk_times, self.chunk_tokens, strict=True) if n), None)

    def inter_token_latencies(self) -> list[float]:
        """The gap before each chunk after the first, spread over the chunk's tokens."""
        out: list[float] = []
        chunks = [(t, n) for t, n in zip(self.chunk_times, self.chunk_tokens, strict=True) if n]
        for (t0, _), (t1, n) in zip(chunks, chunks[1:], strict=False):
            out += [(t1 - t0) / n] * n
        return out


@dataclass
class TimedJob:
    """``bench serving``'s share of one process: requests (index, prompt token ids, max_tokens, arrival
    offset in seconds from the start), at most ``concurrency`` at a time; ``warm`` prompts first,
    2 tokens each, untimed."""

    target: str
    requests: list[tuple[int, list[int], int, float]]
    concurrency: int
    warm: list[list[int]] = field(default_factory=list)

    async def run(self, stubs, start_at) -> list[Timing]:
        from pagedserve.v1 import generation_pb2

        def request(prompt: list[int], max_tokens: int):
            req = generation_pb2.GenerateRequest(sampling_params=generation_pb2.SamplingParams(
                max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
            req.token_ids.ids.extend(prompt)
            return req

        async def one(stub, req, timing: Timing) -> None:
            call = stub.Generate(req)
            times, counts = timing.chunk_times, timing.chunk_tokens
            while (resp := await call.read()) is not _EOF:
                times.append(time.monotonic())
                counts.append(len(resp.token_ids))

        await asyncio.gather(*(one(stubs[i % len(stubs)], request(p, 2), Timing(-1)) for i, p in enumerate(self.warm)))
        t0 = await start_at()
        sem = asyncio.Semaphore(self.concurrency)
        timings = [Timing(index) for index, *_ in self.requests]

        async def send(k: int, prompt: list[int], max_tokens: int, arrival: float) -> None:
            await asyncio.sleep(max(0.0, t0 + arrival - time.monotonic()))
            async with sem:
                timings[k].start = time.monotonic()
                await one(stubs[k % len(stubs)], request(prompt, max_tokens), timings[k])

        await asyncio.gather(*(send(k, p, m, a) for k, (_, p, m, a) in enumerate(self.requests)))
        return timings


@dataclass
class ClosedLoopJob:
    """``bench gateway``'s share of one process: ``num_streams`` streams, each sending a new request of
    ``max_tokens`` as soon as its last one ends; counts the tokens and responses received between
    ``warmup_s`` and ``warmup_s + duration_s`` after the start. Every ``check_every``-th request's text
    is compared with the tokenizer's decode of its ids (``model``: the tokenizer's directory)."""

    target: str
    num_streams: int
    max_tokens: int
    prompt: str
    warmup_s: float
    duration_s: float
    model: str
    check_every: int = 8

    async def run(self, stubs, start_at) -> dict:
        from tokenizers import Tokenizer

        from pagedserve.v1 import generation_pb2

        tok = Tokenizer.from_file(f"{self.model}/tokenizer.json")
        params = generation_pb2.SamplingParams(max_tokens=self.max_tokens, temperature=0.0, ignore_eos=True)
        counts = {"tokens": 0, "responses": 0, "requests": 0, "checked": 0, "mismatches": 0}
        t0 = await start_at()
        bounds = (t0 + self.warmup_s, t0 + self.warmup_s + self.duration_s)
        gaps: list[tuple[float, int]] = []  # (time since the request's previous response, tokens) in the window
        ttft: list[float] = []  # time to the first token of the requests whose first token came in the window
        stop = asyncio.Event()

        async def stream(i: int) -> None:
            stub, seq = stubs[i % len(stubs)], 0
            while not stop.is_set():
                check = (seq * self.num_streams + i) % self.check_every == 0
                seq += 1
                ids, texts, last = [], [], None
                sent = time.monotonic()
                call = stub.Generate(generation_pb2.GenerateRequest(text=self.prompt, sampling_params=params))
                while (resp := await call.read()) is not _EOF:
                    n = len(resp.token_ids)
                    counts["tokens"] += n
                    counts["responses"] += 1
                    now = time.monotonic()
                    if n and bounds[0] <= now < bounds[1]:
                        if last is None:
                            ttft.append(now - sent)
                        else:
                            gaps.append((now - last, n))
                    last = now if n else last
                    if check:
                        ids += resp.token_ids
                        texts.append(resp.text)
                counts["requests"] += 1
                if check:
                    counts["checked"] += 1
                    counts["mismatches"] += "".join(texts) != tok.decode(ids, skip_special_tokens=True)

        tasks = [asyncio.create_task(stream(i)) for i in range(self.num_streams)]
        await asyncio.sleep(max(0.0, bounds[0] - time.monotonic()))
        before = dict(counts)
        await asyncio.sleep(max(0.0, bounds[1] - time.monotonic()))
        counted = {k: counts[k] - before[k] for k in ("tokens", "responses")}
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        itl = sorted(g / n for g, n in gaps for _ in range(n))  # per token: a response's gap spread over it
        return counted | {k: counts[k] for k in ("requests", "checked", "mismatches")} | {
            "itl_s": itl[:: max(1, len(itl) // 20000)], "ttft_s": ttft}  # ITL: an even sample of the sorted values


_EOF = None  # grpc.aio.EOF, bound in the child


def _child(conn, job, num_channels: int) -> None:
    """A client process: connect, run ``job`` when the parent says when, send back its result."""
    global _EOF
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    import clients  # noqa: F401
    from pagedserve.v1 import generation_pb2_grpc

    _EOF = grpc.aio.EOF

    async def serving(channel) -> None:
        """Waits until the gateway at the other end of this connection is SERVING."""
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no SERVING gateway at {job.target} within {READY_TIMEOUT_S:g} s")
            await asyncio.sleep(0.2)

    async def main():
        channels = [grpc.aio.insecure_channel(job.target, options=CHANNEL_OPTIONS) for _ in range(num_channels)]
        await asyncio.gather(*(serving(c) for c in channels))
        stubs = [generation_pb2_grpc.GenerationServiceStub(c) for c in channels]

        cpu0 = []

        async def start_at() -> float:
            conn.send(("ready", None))
            t0 = await asyncio.to_thread(conn.recv)
            await asyncio.sleep(max(0.0, t0 - time.monotonic()))
            cpu0.append(time.process_time())  # this process's CPU (all threads) from the start on
            return t0

        try:
            result = await job.run(stubs, start_at)
            return result, time.process_time() - cpu0[0]
        finally:
            await asyncio.gather(*(c.close() for c in channels))

    try:
        conn.send(("result", asyncio.run(main())))
    except BaseException as exc:  # the parent reports it; nothing is left to clean up here
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


class ClientPool:
    """Client processes, one job each: ``start`` (connect, warm up), ``go`` (all at one instant),
    ``results``."""

    def __init__(self, jobs: list, channels_per_process: list[int]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conns, self.processes = [], []
        self.cpu_s: list[float] = []
        for job, num_channels in zip(jobs, channels_per_process, strict=True):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_child, args=(child, job, max(1, min(MAX_CHANNELS, num_channels))),
                               daemon=True)
            proc.start()
            self._conns.append(parent)
            self.processes.append(proc)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def _receive(self, conn, timeout_s: float):
        if not conn.poll(timeout_s):
            raise TimeoutError("a benchmark client process did not answer")
        kind, value = conn.recv()
        if kind == "error":
            raise RuntimeError(f"a benchmark client process failed: {value}")
        return value

    def wait_ready(self, timeout_s: float = 900.0) -> None:
        deadline = time.monotonic() + timeout_s
        for conn in self._conns:
            self._receive(conn, max(0.0, deadline - time.monotonic()))

    def go(self, delay_s: float = 0.2) -> float:
        """Starts every process at one instant ``delay_s`` from now; returns that instant."""
        t0 = time.monotonic() + delay_s
        for conn in self._conns:
            conn.send(t0)
        return t0

    def results(self, timeout_s: float = 3600.0) -> list:
        """Each process's result; ``cpu_s`` then holds the CPU seconds each used from the start on (read
        by the process itself: it has exited before the parent could read /proc)."""
        deadline = time.monotonic() + timeout_s
        out = [self._receive(conn, max(0.0, deadline - time.monotonic())) for conn in self._conns]
        for p in self.processes:
            p.join(10)
        self.cpu_s = [cpu for _, cpu in out]
        return [result for result, _ in out]

    def close(self) -> None:
        for p in self.processes:
            if p.is_alive():
                p.kill()
                p.join()


def poisson_arrivals(num: int, rate: float | None, seed: int) -> list[float]:
    """Arrival offsets (s) of ``num`` requests at ``rate`` per second (None: all at 0)."""
    rng = random.Random(seed)
    out, t = [], 0.0
    for _ in range(num):
        out.append(t)
        if rate:
            t += rng.expovariate(rate)
    return out


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    """p50 / p90 / p99 in milliseconds (the value at rank floor(q% of n)); NaN without values."""
    ordered, n = sorted(seconds), len(seconds)
    return {f"p{q}": 1e3 * ordered[min(n - 1, n * q // 100)] if n else float("nan") for q in (50, 90, 99)}
