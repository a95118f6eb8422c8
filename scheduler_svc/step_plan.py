"""Encoding a scheduled step as the StepPlan the workers execute, and reading their StepResult."""

from __future__ import annotations

from dataclasses import dataclass

import clients  # noqa: F401
from pagedserve.internal.v1 import worker_pb2
from scheduler_svc.scheduler import SchedulerOutput


def encode_step(out: SchedulerOutput) -> bytes:
    """The WorkerCommand carrying ``out``: new sequences in full, running ones as deltas."""
    cmd = worker_pb2.WorkerCommand()
    plan = cmd.step
    plan.step_id = out.step_id
    plan.finished_seq_ids.extend(out.finished_seq_ids)
    num_top = 0
    for sched in out.new_seqs:
        seq = sched.seq
        params = seq.request.params
        plan.new_seqs.add(
            seq_id=seq.seq_id,
            token_ids=seq.token_ids,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_computed_tokens=seq.num_computed_tokens,
            num_scheduled_tokens=sched.num_scheduled_tokens,
            block_ids=sched.block_ids,
            sampling_params=params,
        )
        num_top = max(num_top, params.top_logprobs)
    running = out.running
    if running:
        plan.running_seq_ids.extend([s.seq.seq_id for s in running])
        plan.running_num_scheduled_tokens.extend([s.num_scheduled_tokens for s in running])
        plan.running_num_new_blocks.extend([len(s.block_ids) for s in running])
        plan.running_new_block_ids.extend([b for s in running for b in s.block_ids])
        num_top = max(num_top, max(s.seq.request.params.top_logprobs for s in running))
    plan.num_top_logprobs = num_top
    return cmd.SerializeToString()


@dataclass(slots=True)
class DecodedResult:
    step_id: int
    sampled: dict[int, int]  # seq_id -> token id
    logprobs: dict[int, float]  # seq_id -> logprob of the sampled token (when returned)
    timings: worker_pb2.StepTimings
    error: str


def decode_result(result: worker_pb2.StepResult) -> DecodedResult:
    sampled = dict(zip(result.seq_ids, result.sampled_token_ids, strict=True))
    logprobs = dict(zip(result.seq_ids, result.sampled_logprobs, strict=False))
    return DecodedResult(result.step_id, sampled, logprobs, result.timings, result.error)
