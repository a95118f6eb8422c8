"""The worker's edge of the step contract: a ``StepPlan`` decoded once into plain dataclasses on the way
in, a ``StepOutput`` encoded into a ``StepResult`` on the way out.

Protobuf stays at the process boundary (worker.py): the model runner, the prompt-logprob rows and the
step profiler read these dataclasses, whose field names are the proto's, so the contract in
protos/pagedserve/internal/v1/worker.proto documents them too. Sampling parameters are decoded here,
once per new sequence or fork, instead of wherever a reader needs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import clients  # noqa: F401
from gpu_worker.sampling_params import SamplingParams
from pagedserve.internal.v1 import scheduler_pb2, worker_pb2


@dataclass(slots=True)
class NewSequence:
    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    num_computed_tokens: int
    num_scheduled_tokens: int
    block_ids: list[int]
    params: SamplingParams


@dataclass(slots=True)
class Fork:
    parent_seq_id: int
    child_seq_id: int
    token_id: int | None  # the child's last token instead of the parent's (beam search)
    params: SamplingParams | None  # the child's own parameters (parallel sampling's per-sample seed)


@dataclass(slots=True)
class TableUpdate:
    seq_id: int
    positions: list[int]
    block_ids: list[int]


@dataclass(slots=True)
class StepPlan:
    """One step, as worker.proto's StepPlan says (the same fields, in the same order of application)."""

    step_id: int
    finished_seq_ids: list[int] = field(default_factory=list)
    forks: list[Fork] = field(default_factory=list)
    last_tokens: list[tuple[int, int]] = field(default_factory=list)  # (seq_id, token id) pairs
    swap_out: tuple[list[int], list[int]] = ([], [])  # (device sources, CPU destinations)
    swap_in: tuple[list[int], list[int]] = ([], [])  # (CPU sources, device destinations)
    copies: tuple[list[int], list[int]] = ([], [])  # copy-on-write (sources, destinations)
    new_seqs: list[NewSequence] = field(default_factory=list)
    table_updates: list[TableUpdate] = field(default_factory=list)
    running_seq_ids: list[int] = field(default_factory=list)
    running_num_scheduled_tokens: list[int] = field(default_factory=list)
    running_num_new_blocks: list[int] = field(default_factory=list)
    running_new_block_ids: list[int] = field(default_factory=list)
    num_top_logprobs: int = 0

    @property
    def has_block_ops(self) -> bool:
        return bool(self.swap_out[0] or self.swap_in[0] or self.copies[0])


def decode_plan(plan: worker_pb2.StepPlan) -> StepPlan:
    """The proto's fields as lists and dataclasses, read once (the runner used to read some of them twice)."""
    return StepPlan(
        step_id=plan.step_id,
        finished_seq_ids=list(plan.finished_seq_ids),
        forks=[Fork(f.parent_seq_id, f.child_seq_id, f.token_id if f.HasField("token_id") else None,
                    SamplingParams.from_proto(f.sampling_params) if f.HasField("sampling_params") else None)
               for f in plan.forks],
        last_tokens=list(zip(plan.last_token_seq_ids, plan.last_token_ids, strict=True)),
        swap_out=(list(plan.swap_out_src_block_ids), list(plan.swap_out_dst_block_ids)),
        swap_in=(list(plan.swap_in_src_block_ids), list(plan.swap_in_dst_block_ids)),
        copies=(list(plan.copy_src_block_ids), list(plan.copy_dst_block_ids)),
        new_seqs=[NewSequence(n.seq_id, list(n.token_ids), n.num_prompt_tokens, n.num_computed_tokens,
                              n.num_scheduled_tokens, list(n.block_ids), SamplingParams.from_proto(n.sampling_params))
                  for n in plan.new_seqs],
        table_updates=[TableUpdate(u.seq_id, list(u.positions), list(u.block_ids)) for u in plan.table_updates],
        running_seq_ids=list(plan.running_seq_ids),
        running_num_scheduled_tokens=list(plan.running_num_scheduled_tokens),
        running_num_new_blocks=list(plan.running_num_new_blocks),
        running_new_block_ids=list(plan.running_new_block_ids),
        num_top_logprobs=plan.num_top_logprobs,
    )


@dataclass(slots=True)
class PromptLogprobs:
    """One sequence's prompt logprobs from one step (scheduler.proto's PromptLogprobs)."""

    seq_id: int
    first_position: int
    logprobs: list[float]
    ranks: list[int]
    top: list[tuple[list[int], list[float]]] = field(default_factory=list)  # (ids, logprobs) per entry


@dataclass(slots=True)
class StepTimings:
    prepare_ns: int = 0
    forward_ns: int = 0
    sample_ns: int = 0
    total_ns: int = 0


@dataclass(slots=True)
class StepOutput:
    """A step's result on this rank (worker.proto's StepResult; ``error`` is the worker's to set)."""

    step_id: int
    seq_ids: list[int] = field(default_factory=list)  # the sequences that sampled, in batch order
    sampled_token_ids: list[int] = field(default_factory=list)
    sampled_logprobs: list[float] = field(default_factory=list)  # parallel to seq_ids, when asked
    top_logprobs: list[tuple[list[int], list[float]]] = field(default_factory=list)  # parallel, when asked
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)
    seq_errors: dict[int, str] = field(default_factory=dict)  # sequences whose own data failed the step
    timings: StepTimings = field(default_factory=StepTimings)

    def to_proto(self) -> worker_pb2.StepResult:
        t = self.timings
        result = worker_pb2.StepResult(
            step_id=self.step_id, seq_ids=self.seq_ids, sampled_token_ids=self.sampled_token_ids,
            sampled_logprobs=self.sampled_logprobs,
            timings=worker_pb2.StepTimings(prepare_ns=t.prepare_ns, forward_ns=t.forward_ns,
                                           sample_ns=t.sample_ns, total_ns=t.total_ns),
        )
        for ids, lps in self.top_logprobs:
            result.top_logprobs.add(token_ids=ids, logprobs=lps)
        for p in self.prompt_logprobs:
            result.prompt_logprobs.append(scheduler_pb2.PromptLogprobs(
                seq_id=p.seq_id, first_position=p.first_position, logprobs=p.logprobs, ranks=p.ranks,
                top=[scheduler_pb2.TopLogprobs(token_ids=ids, logprobs=lps) for ids, lps in p.top]))
        for seq_id, error in self.seq_errors.items():
            result.seq_errors.add(seq_id=seq_id, error=error)
        return result
