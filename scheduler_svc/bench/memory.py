"""``pagedserve bench memory``: what paging and sharing KV blocks buy, set beside the PagedAttention paper
(Kwon et al. 2023).

Three measurements:
1. KV utilization: token slots holding state / token slots allocated, averaged over engine steps, for
   our block tables and, on the same batches, for static per-request reservations as in Orca (max
   context length, the next power of two of the request's length, its exact length). Simulated worker.
2. Sharing: KV blocks in use with sharing / without (every sequence holding its own copy), averaged
   over steps, for parallel sampling (n = 2, 4, 6) and beam search (width 2, 4, 6) on Alpaca-like and
   ShareGPT-like lengths. Simulated worker.
3. Shared prefix: requests/s with and without prefix caching when every prompt starts with the same
   few-shot prefix (one-shot about 80 tokens, five-shot about 340). Real worker: LLM on the demo
   checkpoint (CPU unless --device says otherwise).

The simulated worker is the scheduler alone, run step by step, with sampled tokens drawn from a seeded
toy distribution (for beams: candidates whose log probabilities fall by Exp(1) gaps); block counts do
not depend on the model, only the beam paths do.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from gpu_worker.engine_args import EngineArgs
from scheduler_svc.command import Command

# Length distributions of the paper's traces (mean input / output tokens), drawn log-normally.
TRACES = {"alpaca": (19.31, 58.45), "sharegpt": (161.31, 337.99)}
VOCAB = 32000
MAX_LEN = 2048  # context length of the simulated model (OPT's, as in the paper)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-requests", type=int, default=300, help="requests per simulated workload (default 300)")
    EngineArgs.add_args(p, "bench-memory")  # --device (of the real worker) and --block-size
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic traces (default 0)")
    p.add_argument("--prefix-requests", type=int, default=96,
                   help="requests per shared-prefix throughput run (default 96)")
    p.add_argument("--prefix-kv-blocks", type=int, default=64,
                   help="KV pool of the shared-prefix runs, in blocks: small, so that memory bounds the batch "
                   "as in the paper's serving runs (default 64)")
    p.add_argument("--prefix-hidden-size", type=int, default=512,
                   help="hidden size of the llama checkpoint for the shared-prefix runs (head_dim 64, 4 layers); "
                   "large enough that computing tokens, not per-step overhead, dominates (default 512)")
    p.add_argument("--shape", default=None,
                   help="shared-prefix runs on a random-weight model of this shape (bench throughput's shapes), "
                   "with --device cuda; the pool is still capped at --prefix-kv-blocks")
    p.add_argument("--repeats", type=int, default=3, help="shared-prefix runs per setting, best kept (default 3)")
    p.add_argument("--skip-prefix", action="store_true", help="skip the shared-prefix throughput runs")


def lognormal_lengths(mean: float, n: int, rng: random.Random, sigma: float = 0.8, cap: int = 1024) -> list[int]:
    mu = math.log(mean) - sigma**2 / 2
    return [min(cap, max(1, round(rng.lognormvariate(mu, sigma)))) for _ in range(n)]


@dataclass
class Trace:
    prompts: list[list[int]]
    output_lens: list[int]


def make_trace(name: str, n: int, seed: int) -> Trace:
    rng = random.Random(f"{name}/{seed}")
    mean_in, mean_out = TRACES[name]
    ins = lognormal_lengths(mean_in, n, rng)
    outs = lognormal_lengths(mean_out, n, rng)
    return Trace([[rng.randrange(3, VOCAB) for _ in range(m)] for m in ins], outs)


# ---- the simulated worker


def toy_candidates(token_ids: list[int], k: int) -> tuple[list[int], list[float]]:
    """k candidate tokens with log probabilities falling by Exp(1) gaps, seeded by the last tokens."""
    rng = random.Random(hash(tuple(token_ids[-4:])))
    tokens = rng.sample(range(3, VOCAB), k)
    lp, lps = -rng.expovariate(1.0), []
    for _ in range(k):
        lps.append(lp)
        lp -= rng.expovariate(1.0)
    return tokens, lps


@dataclass
class StepStats:
    used_blocks: list[int]  # distinct blocks held, per step
    unshared_blocks: list[int]  # sum of table lengths, per step
    filled_slots: list[int]  # distinct token slots holding state, per step
    reserved: dict[str, list[int]]  # Orca-style reservations of the same batch, per step


def simulate(trace: Trace, block_size: int, n: int = 1, beam_width: int = 1, utilization: bool = False) -> StepStats:
    """Runs the trace through the scheduler with a simulated worker; all requests arrive at once."""
    from gpu_worker.sampling_params import SamplingParams
    from scheduler_svc.config import SchedulerConfig
    from scheduler_svc.scheduler import Scheduler

    # Room for every sequence unshared: sharing is measured, never forced by a full pool.
    lengths = [len(p) + o for p, o in zip(trace.prompts, trace.output_lens, strict=True)]
    num_blocks = sum(-(-m // block_size) for m in lengths) * max(n, beam_width)
    sched = Scheduler(SchedulerConfig(block_size=block_size, max_num_seqs=256, max_num_batched_tokens=4096,
                                      enable_prefix_caching=False, max_num_waiting=0),
                      num_blocks, MAX_LEN, eos_token_ids=[], vocab_size=VOCAB)
    final_len: dict[str, int] = {}
    for i, (prompt, out_len) in enumerate(zip(trace.prompts, trace.output_lens, strict=True)):
        params = SamplingParams(max_tokens=out_len, temperature=1.0, ignore_eos=True, n=n, beam_width=beam_width)
        sched.add_request(0, str(i), prompt, params)
        final_len[str(i)] = len(prompt) + out_len
    stats = StepStats([], [], [], {"max": [], "pow2": [], "oracle": []})
    rng = random.Random(1)
    while sched.has_work():
        out = sched.schedule()
        scheduled = {s.seq.seq_id: s.num_scheduled_tokens for s in out.new_seqs + out.running}
        stats.used_blocks.append(sched.pool.num_blocks - sched.pool.num_free_blocks)
        stats.unshared_blocks.append(sum(len(t) for t in sched.kv.tables().values()))
        if utilization:
            _record_utilization(sched, scheduled, final_len, stats)
        sampled, top = {}, {}
        for s in out.new_seqs + out.running:
            seq = s.seq
            if seq.num_computed_tokens + s.num_scheduled_tokens == seq.num_tokens:
                sampled[seq.seq_id] = rng.randrange(3, VOCAB)
                if seq.request.beam is not None:
                    top[seq.seq_id] = toy_candidates(seq.token_ids, seq.request.beam.num_candidates)
        sched.update(out, sampled, top=top)
    return stats


def _record_utilization(sched, scheduled: dict[int, int], final_len: dict[str, int], stats: StepStats) -> None:
    """Slots holding state (counted once per physical block) and, for the same running requests,
    what static reservations would hold."""
    bs = sched.block_size
    fill: dict[int, int] = {}
    for seq in sched.running:
        end = seq.num_computed_tokens + scheduled.get(seq.seq_id, 0)
        for i, block_id in enumerate(sched.kv.block_table(seq.seq_id)):
            fill[block_id] = max(fill.get(block_id, 0), min(bs, max(0, end - i * bs)))
    stats.filled_slots.append(sum(fill.values()))
    lengths = [final_len[seq.request.request_id] for seq in sched.running]
    stats.reserved["max"].append(MAX_LEN * len(lengths))
    stats.reserved["pow2"].append(sum(1 << (m - 1).bit_length() for m in lengths))
    stats.reserved["oracle"].append(sum(lengths))


def ratio(num: list[int], den: list[int]) -> float:
    return sum(num) / max(1, sum(den))


# ---- the three sections


def utilization_section(args) -> list[str]:
    lines = ["KV utilization: token slots holding state / slots allocated, averaged over steps "
             "(simulated worker; static reservations applied to the same batches)",
             "| trace | pagedserve blocks | static: max length (2048) | static: pow2 | static: exact length |",
             "|---|---|---|---|---|"]
    for name in TRACES:
        st = simulate(make_trace(name, args.num_requests, args.seed), args.block_size, utilization=True)
        ours = ratio(st.filled_slots, [b * args.block_size for b in st.used_blocks])
        static = {k: ratio(st.filled_slots, v) for k, v in st.reserved.items()}
        lines.append(f"| {name} | {ours:.1%} | {static['max']:.1%} | {static['pow2']:.1%} | {static['oracle']:.1%} |")
    return lines


def sharing_section(args) -> list[str]:
    lines = ["Memory saved by sharing: 1 - blocks in use / blocks without sharing, averaged over steps "
             "(simulated worker)",
             "| trace | parallel n=2 | n=4 | n=6 | beam width 2 | 4 | 6 |",
             "|---|---|---|---|---|---|---|"]
    for name in TRACES:
        trace = make_trace(name, args.num_requests, args.seed)
        cells = []
        for kind in ("n", "beam_width"):
            for k in (2, 4, 6):
                st = simulate(trace, args.block_size, **{kind: k})
                cells.append(f"{1 - ratio(st.used_blocks, st.unshared_blocks):.1%}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def prefix_section(args) -> list[str]:
    from gpu_worker.demo_model import write_demo_model

    model_desc = (f"random {args.shape} weights" if args.shape else
                  f"demo llama checkpoint of hidden size {args.prefix_hidden_size} and 4 layers")
    lines = ["Shared prefix: requests/s with and without prefix caching (real worker: LLM, "
             f"{model_desc}, {args.device}, a pool of "
             f"{args.prefix_kv_blocks} blocks of {args.block_size} tokens; "
             f"{args.prefix_requests} requests of prefix + 8-24 own tokens, 16 output tokens each, after one "
             f"warm-up request; best of {args.repeats} runs with fresh suffixes; engine steps and prompt tokens "
             "computed per run beside)",
             "| prefix | tokens | caching off | caching on | speed-up | steps off / on "
             "| prompt tokens computed off / on |",
             "|---|---|---|---|---|---|---|"]
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        if args.shape:
            from scheduler_svc.bench.throughput import write_shape_config

            model = write_shape_config(args.shape, Path(tmp) / args.shape, 512)
        else:
            h = args.prefix_hidden_size
            model = write_demo_model(Path(tmp) / "demo", arch="llama", hidden_size=h, intermediate_size=3 * h,
                                     num_attention_heads=max(1, h // 64), num_key_value_heads=max(1, h // 128),
                                     head_dim=64, num_hidden_layers=4)
        for name, prefix_len in (("one-shot", 80), ("five-shot", 340)):
            prefix = [rng.randrange(3, 1000) for _ in range(prefix_len)]
            batches = [[prefix + [rng.randrange(3, 1000) for _ in range(rng.randint(8, 24))]
                        for _ in range(args.prefix_requests)] for _ in range(args.repeats)]
            off = _prefix_runs(model, prefix, batches, False, args)
            on = _prefix_runs(model, prefix, batches, True, args)
            lines.append(f"| {name} | {prefix_len} | {off[0]:.2f} req/s | {on[0]:.2f} req/s | {on[0] / off[0]:.2f}x | "
                         f"{off[1]} / {on[1]} | {off[2]} / {on[2]} |")
    return lines


def _prefix_runs(model, prefix: list[int], batches, caching: bool, args) -> tuple[float, int, int]:
    """Best requests/s over the batches, with that run's engine steps and computed prompt tokens."""
    from gpu_worker.model_config import ModelConfig
    from gpu_worker.sampling_params import SamplingParams
    from gpu_worker.worker import WorkerConfig
    from scheduler_svc.llm import LLM

    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    dtype = WorkerConfig(model=str(model), scheduler_address="", device=args.device).torch_dtype
    kv_bytes = args.prefix_kv_blocks * args.block_size * ModelConfig.from_dir(model).kv_bytes_per_token(dtype)
    best = (0.0, 0, 0)
    with LLM(model, device=args.device, block_size=args.block_size, enable_prefix_caching=caching,
             kv_cache_memory=kv_bytes, max_num_blocks=args.prefix_kv_blocks,
             load_format="dummy" if args.shape else "auto") as llm:
        llm.generate([prefix + [5]], params)  # warm-up; with caching, the prefix is cached from here on
        for prompts in batches:
            before = llm.stats()
            t0 = time.perf_counter()
            llm.generate(prompts, params)
            rate = len(prompts) / (time.perf_counter() - t0)
            after = llm.stats()
            if rate > best[0]:
                best = (rate, after.num_steps - before.num_steps,
                        after.num_computed_prompt_tokens - before.num_computed_prompt_tokens)
    return best


def run(args) -> int:
    import platform

    t0 = time.perf_counter()
    print(f"pagedserve bench memory: block size {args.block_size}, {args.num_requests} requests per trace, "
          f"seed {args.seed}; {platform.processor() or platform.machine()}, python {platform.python_version()}")
    for name, (mean_in, mean_out) in TRACES.items():
        trace = make_trace(name, args.num_requests, args.seed)
        print(f"  {name}-like trace: input mean {statistics.mean(map(len, trace.prompts)):.1f} "
              f"(target {mean_in}), output mean {statistics.mean(trace.output_lens):.1f} (target {mean_out})")
    sections = [utilization_section, sharing_section] + ([] if args.skip_prefix else [prefix_section])
    for section in sections:
        print()
        print("\n".join(section(args)), flush=True)
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    return 0


COMMAND = Command("memory", "KV utilization, sharing savings and prefix-cache speed-up", __doc__.split("\n\n")[0],
                  add_arguments, run)
