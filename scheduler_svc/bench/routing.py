"""``pagedserve bench serving --prefix-groups G``: a workload of shared prefixes, and with
``--compare-routing`` the same workload through one engine, through N engines with prefix routing and
through N engines with round-robin.

Workload: ``--num-prompts`` prompts in G groups; a prompt is its group's prefix (``--prefix-len`` random
tokens) followed by its own random suffix (``--input-len``). The groups go one after another; a group's
first request goes alone, so that one engine holds the prefix before the rest of the group arrives (at
``--concurrency``), as a shared system prompt does after its first use. The prefix-cache hit rate is the
prompt tokens the responses' usage reports as cached over all prompt tokens. With prefix routing each
group lands on one engine and computes its prefix once, as on a single engine; round-robin spreads a
group over every engine, and each computes the prefix again.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from gpu_worker.engine_args import EngineArgs
from scheduler_svc.bench.service_model import vocab_size, write_placeholder_tokenizer
from scheduler_svc.bench.throughput import parse_lengths, write_shape_config


@dataclass
class GroupWorkload:
    groups: list[list[list[int]]]  # per group, its prompts (token ids)
    output_lens: list[list[int]]  # per group, per prompt

    @property
    def num_prompts(self) -> int:
        return sum(len(g) for g in self.groups)


@dataclass
class Outcome:
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    ttft_s: float


def make_groups(num_groups: int, num_prompts: int, prefix_len: int, input_len: str, output_len: str, vocab: int,
                seed: int = 0) -> GroupWorkload:
    rng = random.Random(seed)
    groups: list[list[list[int]]] = []
    outs: list[list[int]] = []
    for g in range(num_groups):
        n = num_prompts // num_groups + (g < num_prompts % num_groups)
        prefix = [rng.randrange(10, vocab) for _ in range(prefix_len)]
        groups.append([prefix + [rng.randrange(10, vocab) for _ in range(k)]
                       for k in parse_lengths(input_len, n, rng)])
        outs.append(parse_lengths(output_len, n, rng))
    return GroupWorkload(groups, outs)


async def drive_groups(target: str, work: GroupWorkload, concurrency: int | None,
                       num_warm: int = 0, num_engines: int = 1) -> tuple[float, list[Outcome]]:
    """Sends the groups in turn (each group's first request alone); returns the seconds and each request's
    outcome. First, untimed, ``num_warm`` requests at once, shorter than a block (least loaded: they spread
    over the engines), so that no engine's first forward passes are timed."""
    import clients  # noqa: F401
    from pagedserve.client import AsyncClient, SamplingParams

    async def one(client, prompt: list[int], max_tokens: int) -> Outcome:
        start, ttft, tokens, usage = time.perf_counter(), None, 0, None
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        async for chunk in client.generate(prompt, params):
            if chunk.token_ids and ttft is None:
                ttft = time.perf_counter() - start
            tokens += len(chunk.token_ids)
            usage = chunk.usage or usage
        return Outcome(usage.prompt_tokens, usage.cached_prompt_tokens, tokens, ttft or 0.0)

    outcomes: list[Outcome] = []
    async with AsyncClient(target) as client:
        await client.wait_ready(timeout=900)
        # SERVING needs one ready engine; the comparison needs them all, or a group's first requests go
        # elsewhere than its later ones while an engine is still starting.
        deadline = time.monotonic() + 900
        while (await client.load()).num_engines_ready < num_engines:
            if time.monotonic() > deadline:
                raise SystemExit(f"bench serving: {num_engines} engines were not ready within 900 s")
            await asyncio.sleep(0.1)
        await asyncio.gather(*(one(client, [10 + i, 11 + i], 2) for i in range(num_warm)))
        sem = asyncio.Semaphore(concurrency or work.num_prompts)

        async def limited(prompt, max_tokens):
            async with sem:
                return await one(client, prompt, max_tokens)

        t0 = time.perf_counter()
        for prompts, lens in zip(work.groups, work.output_lens, strict=True):
            outcomes.append(await one(client, prompts[0], lens[0]))
            outcomes += await asyncio.gather(*(limited(p, n) for p, n in zip(prompts[1:], lens[1:], strict=True)))
        return time.perf_counter() - t0, outcomes


def report(seconds: float, outcomes: list[Outcome]) -> dict:
    prompt = sum(o.prompt_tokens for o in outcomes)
    output = sum(o.output_tokens for o in outcomes)
    return {
        "requests": len(outcomes), "seconds": seconds, "prompt_tokens": prompt, "output_tokens": output,
        "cached_prompt_tokens": sum(o.cached_tokens for o in outcomes),
        "prefix_cache_hit_rate": sum(o.cached_tokens for o in outcomes) / prompt if prompt else 0.0,
        "output_tok_s": output / seconds, "ttft_ms_p50": 1e3 * statistics.median(o.ttft_s for o in outcomes),
    }


def _passes(args) -> list[tuple[str, int, str]]:
    """(label, engines, routing) of each service to measure."""
    if not args.compare_routing:
        return [(f"{args.engines} engine(s), {args.routing}", args.engines, args.routing)]
    n = max(args.engines, 2)
    return [("1 engine", 1, "prefix"), (f"{n} engines, prefix", n, "prefix"),
            (f"{n} engines, round-robin", n, "round-robin")]


def run(args) -> int:

    if not (args.num_prompts and args.input_len and args.output_len and args.prefix_len):
        raise SystemExit("--prefix-groups needs --num-prompts, --input-len, --output-len and --prefix-len")
    results = {}
    with tempfile.TemporaryDirectory(prefix="pagedserve-bench-") as tmp:
        model_dir, load_format = (Path(args.model), "auto") if args.model else (Path(tmp) / str(args.shape), "dummy")
        vocab = vocab_size(args, model_dir)
        work = make_groups(args.prefix_groups, args.num_prompts, args.prefix_len, args.input_len, args.output_len,
                           vocab, args.seed)
        if args.target:
            results[args.target] = report(*asyncio.run(drive_groups(args.target, work, args.concurrency)))  # no warm-up
        else:
            try:
                engine = EngineArgs.from_args(args, "bench-serving", model=str(model_dir), load_format=load_format)
            except ValueError as exc:
                raise SystemExit(f"pagedserve bench serving: {exc}") from None
            if args.shape and not args.model:
                longest = max(len(p) + n for g, lens in zip(work.groups, work.output_lens, strict=True)
                              for p, n in zip(g, lens, strict=True))
                write_shape_config(args.shape, model_dir, longest)
                write_placeholder_tokenizer(model_dir, vocab)
            for label, engines, routing in _passes(args):
                print(f"shared-prefix workload: {work.num_prompts} requests in {len(work.groups)} groups, {label}",
                      flush=True)
                server = subprocess.Popen([sys.executable, "-m", "scheduler_svc.cli", "serve", *engine.to_argv("serve"),
                                           "--port", str(args.port), "--log-level", "warning", "--engines",
                                           str(engines), "--routing", routing])
                try:
                    results[label] = report(*asyncio.run(drive_groups(f"127.0.0.1:{args.port}", work,
                                                                      args.concurrency, 2 * engines, engines)))
                finally:
                    server.terminate()
                    server.wait(timeout=120)
    print(f"\n{'service':<28} {'prefix-cache hit rate':>22} {'output tok/s':>13} {'TTFT p50 ms':>12}")
    for label, r in results.items():
        print(f"{label:<28} {100 * r['prefix_cache_hit_rate']:>21.1f}% {r['output_tok_s']:>13,.0f} "
              f"{r['ttft_ms_p50']:>12.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


def add_arguments(p) -> None:
    g = p.add_argument_group("engines and routing")
    g.add_argument("--engines", type=int, default=1, help="engines of the service started here (default 1)")
    g.add_argument("--routing", default="prefix", choices=("prefix", "least-loaded", "round-robin"),
                   help="the gateway's routing across engines (default prefix)")
    g.add_argument("--prefix-groups", type=int, default=0,
                   help="shared-prefix workload: prompts in this many groups, each sharing a --prefix-len prefix")
    g.add_argument("--prefix-len", type=int, default=0, help="tokens of each group's shared prefix")
    g.add_argument("--compare-routing", action="store_true",
                   help="run the shared-prefix workload on 1 engine, then on max(--engines, 2) with prefix and with "
                   "round-robin routing, and print each one's prefix-cache hit rate")


def serve_argv(args) -> list[str]:
    """The flags of `pagedserve serve` that this group sets."""
    return ["--engines", str(args.engines), "--routing", args.routing]


def wanted(args) -> bool:
    return bool(args.prefix_groups or args.compare_routing)
