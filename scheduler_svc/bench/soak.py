"""``pagedserve bench soak``: N streams for M minutes through a `pagedserve serve` started here, with a
seeded mix of normal, cancelled, deadline-limited, bad and oversized requests; then the pool is
checked (every KV block free, no request left in the scheduler) and the gateway's memory must not have
grown past a bound.

Every request's outcome is checked against its kind: a normal one finishes (or, under load, is refused
with RESOURCE_EXHAUSTED and a retry hint), a cancelled one ends when cancelled, a deadline-limited one
with DEADLINE_EXCEEDED, a bad one with INVALID_ARGUMENT, an oversized one with RESOURCE_EXHAUSTED
(over the request size) or INVALID_ARGUMENT (over the prompt's byte bound). Anything else is counted
as unexpected and fails the run, as do leaked blocks and memory growth.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from gpu_worker.engine_args import EngineArgs
from scheduler_svc.bench.local_service import LocalService
from scheduler_svc.command import Command

KINDS = {"normal": 0.55, "cancelled": 0.15, "deadline": 0.10, "bad": 0.15, "oversized": 0.05}
PROMPTS = ["Hello, paged world", "The quick brown fox", "café 日本語 and more", "memory block table",
           "A request in the batch", "kernel tensor layer", "decode prefill step", "The river and the mountain"]
WARMUP_FRACTION = 0.2  # the gateway's memory is measured after this share of the run (allocator warm-up)


@dataclass
class SoakReport:
    seconds: float = 0.0
    outcomes: Counter = field(default_factory=Counter)  # (kind, outcome) -> count
    unexpected: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    num_blocks: int = 0
    leaked_blocks: int = 0
    requests_left: int = 0
    rss_mib: dict[str, dict[str, float]] = field(default_factory=dict)  # process -> {start, warm, end}

    def by_kind(self) -> dict[str, int]:
        kinds: Counter = Counter()
        for (kind, _), n in self.outcomes.items():
            kinds[kind] += n
        return dict(kinds)

    def as_dict(self) -> dict:
        return {"seconds": round(self.seconds, 1), "requests": sum(self.outcomes.values()),
                "by_kind": self.by_kind(),
                "outcomes": {f"{k}/{o}": n for (k, o), n in sorted(self.outcomes.items())},
                "unexpected": self.unexpected[:20], "completion_tokens": self.completion_tokens,
                "num_blocks": self.num_blocks, "leaked_blocks": self.leaked_blocks,
                "requests_left": self.requests_left, "rss_mib": self.rss_mib}


class _Mix:
    """The requests of one stream, drawn from a seeded generator."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def kind(self) -> str:
        return self.rng.choices(list(KINDS), weights=list(KINDS.values()))[0]

    def bad_request(self):
        """(params or raw bytes, prompt, model): each invalid in its own way."""
        from pagedserve.client import SamplingParams
        from pagedserve.v1 import generation_pb2

        choice = self.rng.randrange(6)
        if choice == 5:  # text that is not UTF-8
            return generation_pb2.GenerateRequest(text="BAD").SerializeToString().replace(b"BAD", b"\xff\xfe"), "", ""
        params, prompt, model = SamplingParams(max_tokens=8), "hello", ""
        if choice == 0:
            params = SamplingParams(max_tokens=8, top_p=1.5)
        elif choice == 1:
            params = SamplingParams(max_tokens=8, n=0)
        elif choice == 2:
            prompt = ""
        elif choice == 3:
            model = "no-such-model"
        else:
            params = SamplingParams(max_tokens=8, beam_width=2, temperature=0.5)
        return params, prompt, model


async def _one(client, channel, mix: _Mix, report: SoakReport) -> None:
    import grpc

    from pagedserve.client import GenerationError, SamplingParams
    from pagedserve.v1 import generation_pb2

    kind = mix.kind()
    prompt = mix.rng.choice(PROMPTS)
    outcome = "ok"
    try:
        if kind == "normal":
            params = SamplingParams(max_tokens=mix.rng.randint(4, 48), temperature=mix.rng.choice([0.0, 0.8]),
                                    seed=mix.rng.randrange(1000), ignore_eos=mix.rng.random() < 0.5)
            for done in await client.complete(prompt, params, timeout=300):
                report.completion_tokens += len(done.token_ids)
                outcome = done.finish_reason
        elif kind == "cancelled":
            stream = client.generate(prompt, SamplingParams(max_tokens=None, ignore_eos=True), timeout=300)
            wanted, got = mix.rng.randint(1, 20), 0
            async for chunk in stream:
                got += len(chunk.token_ids)
                if got >= wanted:
                    stream.cancel()
            outcome = "cancelled"
        elif kind == "deadline":
            await client.complete(prompt, SamplingParams(max_tokens=None, ignore_eos=True),
                                  timeout=mix.rng.uniform(0.2, 1.0))
        elif kind == "bad":
            request, prompt, model = mix.bad_request()
            if isinstance(request, bytes):
                call = channel.unary_stream("/pagedserve.v1.GenerationService/Generate")
                async for _ in call(request, timeout=60):
                    pass
            else:
                await client.complete(prompt, request, model=model, timeout=60)
        else:  # oversized: over the request limit, or over the prompt's byte bound
            size = mix.rng.choice([5 * 2**20, 600_000])
            payload = generation_pb2.GenerateRequest(text="x" * size, sampling_params=generation_pb2.SamplingParams(
                max_tokens=4)).SerializeToString()
            call = channel.unary_stream("/pagedserve.v1.GenerationService/Generate")
            async for _ in call(payload, timeout=60):
                pass
    except GenerationError as exc:
        outcome = exc.code.name
    except grpc.aio.AioRpcError as exc:
        outcome = exc.code().name
    report.outcomes[(kind, outcome)] += 1
    expected = {"normal": {"length", "stop", "RESOURCE_EXHAUSTED"}, "cancelled": {"cancelled"},
                "deadline": {"DEADLINE_EXCEEDED"}, "bad": {"INVALID_ARGUMENT"},
                "oversized": {"RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"}}[kind]
    if outcome not in expected:
        report.unexpected.append(f"{kind}: {outcome}")


async def _drive(target: str, streams: int, seconds: float, seed: int, report: SoakReport, on_warm) -> None:
    import grpc

    import clients  # noqa: F401
    from pagedserve.client import AsyncClient

    options = [("grpc.max_send_message_length", -1)]
    start = time.monotonic()
    deadline = start + seconds
    warm_at = start + WARMUP_FRACTION * seconds

    async def stream(i: int, client, channel) -> None:
        mix = _Mix(seed * 1000 + i)
        while time.monotonic() < deadline:
            await _one(client, channel, mix, report)

    async def warm_watch() -> None:
        await asyncio.sleep(max(0.0, warm_at - time.monotonic()))
        on_warm()

    async with AsyncClient(target, options=options) as client, grpc.aio.insecure_channel(target,
                                                                                        options=options) as ch:
        await asyncio.gather(warm_watch(), *(stream(i, client, ch) for i in range(streams)))
    report.seconds = time.monotonic() - start


def run_soak(model: str | Path, streams: int, seconds: float, seed: int = 0, serve_args: tuple[str, ...] = (),
             log_dir: str | Path | None = None) -> SoakReport:
    """Starts a service, soaks it, checks the pool; returns the report (raises nothing on a bad run)."""
    report = SoakReport()
    with tempfile.TemporaryDirectory(prefix="pagedserve-soak-") as tmp:
        svc = LocalService(model, *serve_args, log_dir=log_dir or tmp)
        try:
            names = [n for n in ("gateway", "scheduler", "worker") if n in svc.pids]
            rss = {n: {"start": svc.rss_bytes(n) / 2**20} for n in names}

            def on_warm() -> None:
                for n in names:
                    rss[n]["warm"] = svc.rss_bytes(n) / 2**20

            asyncio.run(_drive(svc.target, streams, seconds, seed, report, on_warm))
            for n in names:
                rss[n]["end"] = svc.rss_bytes(n) / 2**20
            report.rss_mib = {n: {k: round(v, 1) for k, v in r.items()} for n, r in rss.items()}
            info = svc.settled_engine_info(timeout_s=30.0)
            report.num_blocks = info.num_blocks
            report.leaked_blocks = info.num_blocks - info.stats.num_free_blocks
            report.requests_left = info.stats.num_requests + info.stats.num_running + info.stats.num_waiting
        finally:
            svc.stop()
    return report


def failures(report: SoakReport, max_rss_growth_mib: float) -> list[str]:
    """Why the run failed; empty when it passed."""
    out = []
    if report.unexpected:
        out.append(f"{len(report.unexpected)} unexpected outcomes, e.g. {report.unexpected[:3]}")
    if report.leaked_blocks or report.requests_left:
        out.append(f"{report.leaked_blocks} KV blocks and {report.requests_left} requests left in the scheduler")
    gateway = report.rss_mib.get("gateway", {})
    growth = gateway.get("end", 0.0) - gateway.get("warm", gateway.get("start", 0.0))
    if growth > max_rss_growth_mib:
        out.append(f"the gateway's memory grew by {growth:.1f} MiB after warm-up (bound {max_rss_growth_mib} MiB)")
    missing = set(KINDS) - set(report.by_kind())
    if missing and report.seconds >= 10:
        out.append(f"no request of kind {sorted(missing)}")
    return out


def run(args) -> int:
    serve_args = tuple(EngineArgs.from_args(args, "bench-soak").to_argv("bench-soak"))
    print(f"soak: {args.streams} streams for {args.minutes:g} min on {args.model}", flush=True)
    report = run_soak(args.model, args.streams, args.minutes * 60, args.seed, serve_args, args.log_dir)
    summary = report.as_dict()
    print(json.dumps(summary, indent=1, ensure_ascii=False))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    problems = failures(report, args.max_rss_growth_mib)
    for p in problems:
        print(f"soak: FAILED: {p}", flush=True)
    if not problems:
        print(f"soak: passed: {sum(report.outcomes.values())} requests, 0 leaked blocks", flush=True)
    return 1 if problems else 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--streams", type=int, default=16, help="concurrent streams (default 16)")
    p.add_argument("--minutes", type=float, default=5.0, help="duration (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the request mix (default 0)")
    # The service's engine settings, as serve declares them, with a small CPU service's defaults.
    EngineArgs.add_args(p.add_argument_group("the service started here"), "bench-soak", device="cpu",
                        kv_cache_memory=64 * 2**20)
    p.add_argument("--max-rss-growth-mib", type=float, default=64.0,
                   help="fail if the gateway's resident memory grows more than this after warm-up (default 64)")
    p.add_argument("--log-dir", default=None, help="keep the service's logs here")
    p.add_argument("--out", default=None, help="write the report as JSON here")


COMMAND = Command("soak", "N streams for M minutes of mixed good and bad requests; then no leak",
                  __doc__.split("\n\n")[0], add_arguments, run)
