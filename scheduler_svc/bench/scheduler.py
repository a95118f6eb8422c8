"""``pagedserve bench scheduler``: cost of one scheduling step with N running decode sequences."""

from __future__ import annotations

import argparse
import statistics
import time

from gpu_worker.engine_args import DEFAULTS, EngineArgs
from scheduler_svc.command import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-seqs", type=int, default=256, help="running decode sequences (default 256)")
    p.add_argument("--context-len", type=int, default=512, help="tokens per sequence (default 512)")
    EngineArgs.add_args(p, "bench-scheduler")
    p.add_argument("--steps", type=int, default=2000, help="steps to time (default 2000)")


def run(args: argparse.Namespace) -> int:
    from gpu_worker.sampling_params import SamplingParams
    from scheduler_svc.config import SchedulerConfig
    from scheduler_svc.scheduler import Scheduler
    from scheduler_svc.step_plan import encode_step

    n, ctx, bs = args.num_seqs, args.context_len, args.block_size
    budget = max(DEFAULTS.max_num_batched_tokens, n)
    # Early arrivals decode while later prompts prefill: leave room for those steps too.
    max_tokens = args.steps + -(-n * ctx // budget) + n + 8
    blocks_per_seq = -(-(ctx + max_tokens) // bs)
    config = SchedulerConfig(block_size=bs, max_num_seqs=n, max_num_batched_tokens=budget, max_num_waiting=0)
    sched = Scheduler(config, num_blocks=n * blocks_per_seq + 1, max_model_len=ctx + max_tokens + 1,
                      eos_token_ids=[], vocab_size=32000)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    for i in range(n):
        sched.add_request(0, f"r{i}", [(i + j) % 32000 for j in range(ctx)], params)
    # Prefill everything (untimed) so every sequence is a running decode.
    while sched.waiting or any(s.num_computed_tokens < s.num_tokens - 1 for s in sched.running):
        out = sched.schedule()
        sched.update(out, {s.seq.seq_id: 1 for s in out.new_seqs + out.running
                           if s.seq.num_computed_tokens + s.num_scheduled_tokens == s.seq.num_tokens})
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        out = sched.schedule()
        encode_step(out)
        times.append(time.perf_counter() - t0)
        sched.update(out, {s.seq.seq_id: 7 for s in out.running})  # untimed: result handling
        assert len(out.running) == n
    med = statistics.median(times) * 1e3
    p90 = statistics.quantiles(times, n=10)[-1] * 1e3
    print(f"steps timed: {args.steps}; block size {bs}; context {ctx}; p90 {p90:.3f} ms")
    print(f"scheduler step: {med:.3f} ms ({n} seqs)")
    return 0


COMMAND = Command("scheduler", "time one scheduling step (plan + encode the StepPlan)",
                  "Time one scheduling step with N running decode sequences.", add_arguments, run)
