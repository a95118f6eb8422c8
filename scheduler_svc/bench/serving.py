"""``pagedserve bench serving``: a seeded workload through the gRPC gateway at a fixed concurrency or
Poisson request rate; throughput, time to first token and inter-token latency percentiles."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from gpu_worker.engine_args import EngineArgs
from scheduler_svc.bench import process_profile, routing
from scheduler_svc.bench.throughput import (
    BENCH_DEFAULTS,
    SHAPES,
    WORKLOADS,
    make_workload,
    run_ours,
    write_shape_config,
)


def write_placeholder_tokenizer(model_dir: Path, vocab_size: int) -> None:
    """A word-level tokenizer.json whose token i spells ``<i>``, so the gateway can detokenize random
    ids of a random-weight shape (detokenization cost included in the measurement)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    tok = Tokenizer(WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.save(str(model_dir / "tokenizer.json"))


@dataclass
class RequestTiming:
    start: float
    first: float | None = None
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival, tokens in the chunk)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.chunks)

    def inter_token_latencies(self) -> list[float]:
        """Gap before each chunk after the first, spread over the chunk's tokens."""
        out = []
        for (t0, _), (t1, n) in zip(self.chunks, self.chunks[1:], strict=False):
            out += [(t1 - t0) / n] * n
        return out


async def _one(client, prompt, params, timing: RequestTiming) -> None:
    async for chunk in client.generate(prompt, params):
        now = time.perf_counter()
        if chunk.token_ids:
            if timing.first is None:
                timing.first = now
            timing.chunks.append((now, len(chunk.token_ids)))


async def drive(target: str, work, concurrency: int | None, rate: float | None, seed: int,
                warm=None, timed=None) -> tuple[float, list]:
    """Sends ``work`` and times it; ``warm``: prompts sent first (2 tokens each, untimed), as the offline
    benchmark warms up, so that kernel compilation for these prompt lengths is not timed. ``timed``: a
    context manager entered around the timed region (the process profiler)."""
    import clients  # noqa: F401
    from pagedserve.client import AsyncClient, SamplingParams

    client = AsyncClient(target)
    await client.wait_ready(timeout=900)
    if warm is not None:
        two = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        await asyncio.gather(*(_one(client, p, two, RequestTiming(time.perf_counter())) for p in warm.prompts))
    rng = random.Random(seed)
    timings = [RequestTiming(0.0) for _ in work.prompts]
    sem = asyncio.Semaphore(concurrency or len(work.prompts))

    async def run(i: int, delay: float) -> None:
        await asyncio.sleep(delay)
        async with sem:
            timings[i].start = time.perf_counter()
            params = SamplingParams(max_tokens=work.output_lens[i], temperature=0.0, ignore_eos=True)
            await _one(client, work.prompts[i], params, timings[i])

    delays, t = [], 0.0
    for _ in work.prompts:
        delays.append(t)
        if rate:
            t += rng.expovariate(rate)
    with timed if timed is not None else contextlib.nullcontext():
        t0 = time.perf_counter()
        await asyncio.gather(*(run(i, d) for i, d in enumerate(delays)))
        seconds = time.perf_counter() - t0
    await client.close()
    return seconds, timings


class _Profiled:
    """The process profiler around the timed region; its report is kept in ``report``."""

    def __init__(self, find_processes, out_dir: Path) -> None:
        self.find_processes, self.out_dir = find_processes, out_dir
        self.profile: process_profile.ProcessProfile | None = None
        self.report: dict = {}

    def __enter__(self):
        # Looked up now, after the warm-up: the launcher starts its children only after it starts.
        self.profile = process_profile.ProcessProfile(self.find_processes(), self.out_dir)
        self.profile.start()
        return self

    def __exit__(self, *exc) -> None:
        assert self.profile is not None
        self.report = self.profile.stop()


def _profiler(args, server: subprocess.Popen | None) -> _Profiled | None:
    """With --profile-dir: the service's processes (when started here) and this client process."""
    if not args.profile_dir:
        return None

    def find() -> dict[str, int]:
        processes = process_profile.service_processes(server.pid) if server is not None else {}
        return processes | {"client": os.getpid()}

    return _Profiled(find, Path(args.profile_dir))


def _vocab_size(args, model_dir: Path) -> int:
    if args.model:
        return json.loads((model_dir / "config.json").read_text())["vocab_size"]
    if args.shape:
        return SHAPES[args.shape]["vocab_size"]
    import clients  # noqa: F401
    from pagedserve.client import Client

    with Client(args.target) as client:
        client.wait_ready(timeout=900)
        return client.model_info().vocab_size


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def _report(timings: list[RequestTiming], seconds: float) -> dict:
    out_tokens = sum(t.num_tokens for t in timings)
    ttft = [t.first - t.start for t in timings if t.first is not None]
    itl = [x for t in timings for x in t.inter_token_latencies()]
    return {
        "requests": len(timings), "seconds": seconds, "output_tokens": out_tokens,
        "output_tok_s": out_tokens / seconds,
        "ttft_ms": {f"p{q}": 1e3 * _pct(ttft, q) for q in (50, 90, 99)},
        "itl_ms": {f"p{q}": 1e3 * _pct(itl, q) for q in (50, 90, 99)},
        "median_itl_ms": 1e3 * statistics.median(itl) if itl else float("nan"),
    }


def run(args) -> int:
    if routing.wanted(args):  # the shared-prefix workload, and the routing comparison
        return routing.run(args)
    if args.workload:
        shape, n, in_len, out_len, _ = WORKLOADS[args.workload]
        args.shape = args.shape or (None if (args.model or args.target) else shape)
        args.num_prompts = args.num_prompts or n
        args.input_len, args.output_len = args.input_len or in_len, args.output_len or out_len
    if not (args.num_prompts and args.input_len and args.output_len):
        raise SystemExit("give --workload or all of --num-prompts, --input-len, --output-len")
    with tempfile.TemporaryDirectory(prefix="pagedserve-bench-") as tmp:
        model_dir, load_format = (Path(args.model), "auto") if args.model else (Path(tmp) / str(args.shape), "dummy")
        vocab = _vocab_size(args, model_dir)
        work = make_workload(args.num_prompts, args.input_len, args.output_len, vocab, args.seed)
        # Other prompts of the same lengths (no prefix-cache hits later), sent first.
        warm = make_workload(args.num_prompts, args.input_len, args.output_len, vocab, args.seed + 1)
        try:
            engine = EngineArgs.from_args(args, "bench-serving", model=str(model_dir), load_format=load_format)
        except ValueError as exc:
            raise SystemExit(f"pagedserve bench serving: {exc}") from None
        server = None
        target = args.target
        if not target:
            if args.shape and not args.model:
                longest = max(len(p) + n for p, n in zip(work.prompts, work.output_lens, strict=True))
                write_shape_config(args.shape, model_dir, longest)
                write_placeholder_tokenizer(model_dir, vocab)
            target = f"127.0.0.1:{args.port}"
            server = subprocess.Popen([sys.executable, "-m", "scheduler_svc.cli", "serve", *engine.to_argv("serve"),
                                       "--port", str(args.port), "--log-level", "warning", *routing.serve_argv(args)])
        try:
            print(f"serving benchmark: {len(work.prompts)} requests to {target}, "
                  f"concurrency {args.concurrency or 'unbounded'}, rate {args.request_rate or 'all at once'}",
                  flush=True)
            # No warm-up for a service that is already running.
            timed = _profiler(args, server)
            seconds, timings = asyncio.run(drive(target, work, args.concurrency, args.request_rate, args.seed,
                                                 None if args.target else warm, timed))
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=120)
        report = _report(timings, seconds)
        if timed is not None:
            report["processes"] = timed.report
            print(process_profile.format_report(timed.report), flush=True)
        if args.offline_too:
            offline = run_ours(engine, work, warm)  # the same engine settings as the service above
            report["offline_output_tok_s"] = offline.output_tok_s
            report["serving_over_offline"] = report["output_tok_s"] / offline.output_tok_s
    out_tokens = report["output_tokens"]
    print(f"\nthroughput: {report['output_tok_s']:,.0f} output tok/s ({out_tokens} tokens in {seconds:.2f} s)")
    print("time to first token (ms): " + "  ".join(f"{k} {v:.1f}" for k, v in report["ttft_ms"].items()))
    print("inter-token latency (ms): " + "  ".join(f"{k} {v:.2f}" for k, v in report["itl_ms"].items()))
    if args.offline_too:
        print(f"offline: {report['offline_output_tok_s']:,.0f} output tok/s; serving / offline = "
              f"{100 * report['serving_over_offline']:.1f}%")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


def add_parser(bench) -> None:
    p = bench.add_parser("serving", help="throughput and latency through the gRPC gateway",
                         description="Send a seeded workload through a pagedserve gateway (started here, "
                         "or --target) and report throughput, time to first token and inter-token latency.")
    p.add_argument("--target", help="a running gateway HOST:PORT (default: start `pagedserve serve` here)")
    p.add_argument("--shape", choices=sorted(SHAPES), help="random-weight model of this shape")
    p.add_argument("--model", help="checkpoint directory")
    p.add_argument("--workload", choices=sorted(WORKLOADS), help="preset: shape, prompts and lengths")
    p.add_argument("--num-prompts", type=int)
    p.add_argument("--input-len", help="N or A-B")
    p.add_argument("--output-len", help="N or A-B")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, help="requests in flight at most (default: all)")
    p.add_argument("--request-rate", type=float, help="Poisson arrivals per second (default: all at once)")
    p.add_argument("--offline-too", action="store_true", help="also run the workload offline, for the ratio")
    p.add_argument("--port", type=int, default=50071, help="port of the gateway started here (default 50071)")
    EngineArgs.add_args(p.add_argument_group("engine"), "bench-serving", **BENCH_DEFAULTS)
    routing.add_arguments(p)
    p.add_argument("--out", help="write the report as JSON here")
    p.add_argument("--profile-dir", help="measure each process's CPU time over the timed region and, with py-spy "
                   "on the PATH, sample its Python stacks into DIR (see scheduler_svc/bench/process_profile.py)")
    p.set_defaults(func=run)
