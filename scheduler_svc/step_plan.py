"""What the scheduler decided for one step (SchedulerOutput), encoded as the StepPlan the workers
execute, and their StepResult read back."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import clients  # noqa: F401
from gpu_worker.sampling_params import SamplingParams
from pagedserve.internal.v1 import worker_pb2
from scheduler_svc.kv_cache_manager import SlotAllocation
from scheduler_svc.request import Sequence

# A request's parameters are encoded once, not per sequence that sends them (new sequences, forks).
# Callers copy the result into the plan and never change it.
_params_proto = functools.lru_cache(maxsize=4096)(SamplingParams.to_proto)


@dataclass(slots=True)
class ScheduledSeq:
    """A running sequence's share of a step: the workers hold its state, so only the delta travels."""

    seq: Sequence
    num_scheduled_tokens: int
    new_block_ids: list[int]  # appended to its block table this step


@dataclass(slots=True)
class ScheduledNewSeq:
    """A sequence the workers do not hold (admitted, resumed after preemption or swap-in, or forked at
    admission): it travels in full."""

    seq: Sequence
    num_scheduled_tokens: int
    block_table: list[int]  # the whole table


@dataclass(slots=True)
class ForkedSeq:
    """A child the workers create from its parent's state before the step."""

    parent_seq_id: int
    child: Sequence
    token_id: int | None = None  # beam search: the child's last token instead of the parent's


@dataclass(slots=True)
class SchedulerOutput:
    step_id: int
    new_seqs: list[ScheduledNewSeq] = field(default_factory=list)
    running: list[ScheduledSeq] = field(default_factory=list)
    finished_seq_ids: list[int] = field(default_factory=list)  # finished, aborted, preempted or swapped
    preempted: list[Sequence] = field(default_factory=list)
    forks: list[ForkedSeq] = field(default_factory=list)
    last_tokens: list[tuple[int, int]] = field(default_factory=list)  # (seq_id, token): beam re-selection
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst)
    table_updates: list[tuple[int, list[int], list[int]]] = field(default_factory=list)  # seq, positions, ids
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, cpu block)
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (cpu block, device block)

    def add_running(self, seq: Sequence, num_scheduled_tokens: int, alloc: SlotAllocation) -> None:
        self.running.append(ScheduledSeq(seq, num_scheduled_tokens, alloc.new_block_ids))
        if alloc.table_update is not None:
            self.copies += alloc.copies
            self.table_updates.append(alloc.table_update)

    def add_new(self, seq: Sequence, num_scheduled_tokens: int, alloc: SlotAllocation, block_table: list[int]) -> None:
        """The whole table travels, so the copies' table update does not."""
        self.new_seqs.append(ScheduledNewSeq(seq, num_scheduled_tokens, block_table))
        self.copies += alloc.copies

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(s.num_scheduled_tokens for s in self.new_seqs) + sum(
            s.num_scheduled_tokens for s in self.running
        )

    @property
    def is_empty(self) -> bool:
        return not (self.new_seqs or self.running)


def encode_step(out: SchedulerOutput) -> bytes:
    """The WorkerCommand carrying ``out``: new sequences in full, running ones as deltas, then the
    sharing the scheduler decided (forks, last tokens, copies, swaps, table updates)."""
    cmd = worker_pb2.WorkerCommand()
    plan = cmd.step
    plan.step_id = out.step_id
    plan.finished_seq_ids.extend(out.finished_seq_ids)
    num_top = 0
    for sched in out.new_seqs:
        seq = sched.seq
        plan.new_seqs.add(
            seq_id=seq.seq_id,
            token_ids=seq.token_ids,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_computed_tokens=seq.num_computed_tokens,
            num_scheduled_tokens=sched.num_scheduled_tokens,
            block_ids=sched.block_table,
            sampling_params=_params_proto(seq.sampling_params),
        )
        num_top = max(num_top, seq.request.num_top_logprobs)
    running = out.running
    if running:
        plan.running_seq_ids.extend([s.seq.seq_id for s in running])
        plan.running_num_scheduled_tokens.extend([s.num_scheduled_tokens for s in running])
        plan.running_num_new_blocks.extend([len(s.new_block_ids) for s in running])
        plan.running_new_block_ids.extend([b for s in running for b in s.new_block_ids])
        num_top = max(num_top, max([s.seq.request.num_top_logprobs for s in running]))
    plan.num_top_logprobs = num_top
    if out.forks or out.last_tokens or out.copies or out.swap_out or out.swap_in:
        _encode_sharing(out, plan)
    return cmd.SerializeToString()


def _encode_sharing(out: SchedulerOutput, plan: worker_pb2.StepPlan) -> None:
    for f in out.forks:
        fork = plan.forks.add(parent_seq_id=f.parent_seq_id, child_seq_id=f.child.seq_id)
        if f.token_id is not None:
            fork.token_id = f.token_id
        elif f.child.params is not None:  # parallel sampling: the sample's own seed
            fork.sampling_params.CopyFrom(_params_proto(f.child.params))
    for seq_id, token in out.last_tokens:
        plan.last_token_seq_ids.append(seq_id)
        plan.last_token_ids.append(token)
    plan.copy_src_block_ids.extend([s for s, _ in out.copies])
    plan.copy_dst_block_ids.extend([d for _, d in out.copies])
    plan.swap_out_src_block_ids.extend([s for s, _ in out.swap_out])
    plan.swap_out_dst_block_ids.extend([d for _, d in out.swap_out])
    plan.swap_in_src_block_ids.extend([s for s, _ in out.swap_in])
    plan.swap_in_dst_block_ids.extend([d for _, d in out.swap_in])
    for seq_id, positions, block_ids in out.table_updates:
        plan.table_updates.add(seq_id=seq_id, positions=positions, block_ids=block_ids)


@dataclass(slots=True)
class DecodedResult:
    step_id: int
    sampled: dict[int, int]  # seq_id -> token id
    logprobs: dict[int, float]  # seq_id -> logprob of the sampled token (when returned)
    timings: worker_pb2.StepTimings
    error: str
    top: dict[int, tuple[list[int], list[float]]] = field(default_factory=dict)  # seq_id -> candidates
    prompt_logprobs: dict[int, object] = field(default_factory=dict)  # seq_id -> scheduler_pb2.PromptLogprobs
    seq_errors: dict[int, str] = field(default_factory=dict)  # seq_id -> why its own sampling failed


def decode_result(result: worker_pb2.StepResult) -> DecodedResult:
    sampled = dict(zip(result.seq_ids, result.sampled_token_ids, strict=True))
    logprobs = dict(zip(result.seq_ids, result.sampled_logprobs, strict=False))
    top = {
        seq_id: (list(t.token_ids), list(t.logprobs))
        for seq_id, t in zip(result.seq_ids, result.top_logprobs, strict=False)
    }
    prompt = {p.seq_id: p for p in result.prompt_logprobs}
    errors = {e.seq_id: e.error for e in result.seq_errors}
    return DecodedResult(result.step_id, sampled, logprobs, result.timings, result.error, top, prompt, errors)
