"""Request and sequence state as the scheduler tracks it (token ids only; text lives in the gateway).

A request is a sequence group: one sequence for plain sampling, up to ``n`` samples for parallel
sampling, up to ``beam_width`` live beams for beam search. The group's sequences share blocks (forks)
and are preempted together.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import clients  # noqa: F401
from gpu_worker import log
from gpu_worker.sampling_params import InvalidField, SamplingParams
from pagedserve.internal.v1 import scheduler_pb2
from scheduler_svc.finish_reason import FinishReason

if TYPE_CHECKING:
    from scheduler_svc.beam_search import BeamSearch



class SeqStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    SWAPPED = enum.auto()  # blocks in the CPU pool; the workers hold no state for it
    FINISHED = enum.auto()


@dataclass(slots=True, eq=False)
class Request:
    """One submitted prompt. ``stream_id`` names the gateway stream that owns it."""

    request_id: str
    stream_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int  # admission order; lower arrived earlier
    stop_token_ids: frozenset[int]  # stop ids plus EOS unless ignore_eos
    seqs: list[Sequence] = field(default_factory=list)  # live and finished samples; live beams
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    # Parallel sampling: samples still to fork from the first sequence once it has computed
    # prompt[:-1]; they then compute the last prompt token together and sample independently.
    num_pending_forks: int = 0
    beam: BeamSearch | None = None  # set for beam search (beam_width > 1)
    max_tokens: int = field(init=False)  # params.max_tokens, read per token
    # Top candidates the workers return for each of the group's sampled tokens: the requested
    # top_logprobs, or for beam search the candidates the re-selection needs.
    num_top_logprobs: int = field(init=False)
    # Prompt logprobs (params.prompt_logprobs set): the next prompt position to report, from 1. A
    # recomputed prompt (preemption) reports each position once; once all are reported the prefix
    # cache may serve this request's prompt again.
    next_prompt_logprob: int = 1

    def __post_init__(self) -> None:
        self.max_tokens = self.params.max_tokens
        self.num_top_logprobs = self.params.top_logprobs

    @property
    def prompt_logprobs_pending(self) -> bool:
        """Whether prompt positions whose logprobs were asked for are still to be computed."""
        return self.params.prompt_logprobs is not None and self.next_prompt_logprob < len(self.prompt_token_ids)

    @property
    def max_num_seqs(self) -> int:
        """Sequences the group may still run at once."""
        if self.beam is not None:
            return self.beam.beam_width
        return sum(s.status is not SeqStatus.FINISHED for s in self.seqs) + self.num_pending_forks


@dataclass(slots=True, eq=False)
class Sequence:
    """One sample or beam of a request. ``token_ids`` is the prompt followed by the outputs so far.

    ``num_computed_tokens`` counts tokens whose KV is in the sequence's blocks; the worker samples a
    new token in a step exactly when the step's computation reaches ``len(token_ids)``. Only the last
    token may be uncomputed after a step, and only it may change (beam re-selection).
    """

    seq_id: int
    request: Request
    token_ids: list[int]
    index: int = 0
    num_computed_tokens: int = 0
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: int = FinishReason.UNSPECIFIED
    # Sampling parameters sent to the workers when they differ from the request's (per-sample seed,
    # beam search); None: the request's.
    params: SamplingParams | None = None
    # Prefix-cache hashes of the full blocks of token_ids[:-1], computed lazily (chained: each covers
    # all tokens up to the end of its block), and how many of the table's blocks carry theirs.
    block_hashes: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0
    beam_score: float = 0.0  # beam search: sum of the output tokens' log probabilities

    @property
    def arrival(self) -> int:
        return self.request.arrival

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.request.prompt_token_ids)

    @property
    def sampling_params(self) -> SamplingParams:
        return self.params if self.params is not None else self.request.params


@dataclass(slots=True)
class SeqOutput:
    """What one step produced for one sequence; ``finish_reason`` set when it ended.

    A finished beam search reports its hypotheses as sequences of their own, ``final_token_ids``
    holding each one's output tokens."""

    seq: Sequence
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: int = FinishReason.UNSPECIFIED
    error: str = ""
    error_field: str = ""
    final_token_ids: list[int] = field(default_factory=list)
    # Alternatives per entry of token_ids (requests asking for top_logprobs): (token ids, logprobs).
    top_logprobs: list[tuple[list[int], list[float]]] = field(default_factory=list)
    status_code: int = 0  # google.rpc.Code of an error (0: decided by error_field)
    prompt_logprobs: scheduler_pb2.PromptLogprobs | None = None  # prompt positions computed this step


def arrival_order(seq: Sequence) -> tuple[int, int]:
    """Sort key of the scheduler's queues: arrival, then seq_id, so a group's sequences are contiguous."""
    return (seq.request.arrival, seq.seq_id)


def sample_seed(seed: int, index: int) -> int:
    """Seed of sample ``index`` of a seeded request; sample 0 keeps the request's seed."""
    if index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**63


def take_prompt_logprobs(seq: Sequence, by_seq: dict) -> scheduler_pb2.PromptLogprobs | None:
    """The prompt logprobs a step returned for ``seq`` that were not reported before (a recomputed prompt
    returns them again), or None; advances the request's next_prompt_logprob."""
    entry = by_seq.get(seq.seq_id)
    request = seq.request
    if entry is None:
        return None
    skip = request.next_prompt_logprob - entry.first_position
    if skip >= len(entry.logprobs):
        return None
    if skip > 0:
        trimmed = type(entry)(first_position=request.next_prompt_logprob, logprobs=entry.logprobs[skip:],
                              ranks=entry.ranks[skip:])
        trimmed.top.extend(entry.top[skip:])
        entry = trimmed
    elif skip < 0:
        raise RuntimeError(f"sequence {seq.seq_id}: prompt logprobs from {entry.first_position}, expected "
                           f"{request.next_prompt_logprob}")
    entry.seq_id = 0
    request.next_prompt_logprob = entry.first_position + len(entry.logprobs)
    return entry


def print_request_failure(request_id: str, exc: BaseException) -> None:
    """The scheduler's record of a request that its own code failed on (a bug): one line naming the
    request, then the traceback."""
    log.get_logger().error("request failed", request_id=request_id[:64], error=log.describe_exception(exc),
                           exc_info=exc)


def failure_message(request_id: str, exc: BaseException) -> str:
    """What a request that failed alone reports: the worker's own words for a sequence its sampler
    failed on (already logged there, with the traceback), else the scheduler's, logged here."""
    if isinstance(exc, WorkerSeqError):
        return f"the worker could not sample this request: {exc}"
    print_request_failure(request_id, exc)
    return f"the scheduler could not process this request: {log.describe_exception(exc)}"


class WorkerSeqError(Exception):
    """A sequence's own sampling failed on the worker (StepResult.seq_errors): its request fails alone,
    and the message is the worker's (type and text of what it raised)."""


class QueueFull(Exception):
    """The waiting queue is at its bound (``max_num_waiting``): the request is refused now, not queued,
    and may be retried later."""


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """What one request may ask of a scheduler."""

    max_model_len: int
    block_size: int
    num_blocks: int
    max_group_size: int  # sequences one step can hold
    vocab_size: int | None = None

    def longest(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Prompt plus output tokens at most."""
        return min(len(prompt_token_ids) + params.max_tokens, self.max_model_len)


def validate_request(
    prompt_token_ids: list[int], params: SamplingParams, stop_token_ids: frozenset[int], limits: RequestLimits
) -> None:
    """Raises InvalidField (naming the field) for a request that can never run on this scheduler.
    ``params`` validated themselves; this checks what needs the scheduler's limits."""
    vocab = limits.vocab_size
    if not prompt_token_ids:
        raise InvalidField("prompt", "must not be empty")
    if vocab is not None and not all(0 <= t < vocab for t in prompt_token_ids):
        bad = next(t for t in prompt_token_ids if not 0 <= t < vocab)
        raise InvalidField("prompt", f"token id {bad} is outside the vocabulary [0, {vocab})")
    if vocab is not None and any(t >= vocab for t, _ in params.logit_bias):
        bad = next(t for t, _ in params.logit_bias if t >= vocab)
        raise InvalidField("logit_bias", f"token id {bad} is outside the vocabulary [0, {vocab})")
    if len(prompt_token_ids) >= limits.max_model_len:
        raise InvalidField(
            "prompt",
            f"{len(prompt_token_ids)} tokens leave no room to generate within the context "
            f"length {limits.max_model_len}",
        )
    width = params.beam_width
    group = max(width, params.n)
    field_name = "beam_width" if width > 1 else "n"
    if group > limits.max_group_size:
        raise InvalidField(field_name, f"{group} sequences exceed the scheduler's step limit {limits.max_group_size}")
    if vocab is not None and params.top_logprobs > vocab:
        raise InvalidField("top_logprobs", f"{params.top_logprobs} exceeds the vocabulary of {vocab} tokens")
    num_candidates = max(2, 1 + len(stop_token_ids)) * width
    if width > 1 and vocab is not None and num_candidates > vocab:
        raise InvalidField("beam_width", f"{width} beams need {num_candidates} candidates per step")
    # The group alone must fit: every sequence holds its own blocks past the shared prompt[:-1].
    longest = limits.longest(prompt_token_ids, params)
    shared = (len(prompt_token_ids) - 1) // limits.block_size
    needed = group * -(-longest // limits.block_size) - (group - 1) * shared
    if needed > limits.num_blocks:
        # The prompt is the cause when it leaves no room for even one generated token per sequence.
        least = group * -(-(len(prompt_token_ids) + 1) // limits.block_size) - (group - 1) * shared
        # Client-facing: in tokens, never in the server's memory layout (blocks).
        bs = limits.block_size
        cache = f"the server's KV cache holds {limits.num_blocks * bs} tokens at once"
        who = "1 sequence" if group == 1 else f"{group} sequences (each past the shared prompt)"
        if least > limits.num_blocks:
            raise InvalidField(
                "prompt",
                f"the prompt ({len(prompt_token_ids)} tokens) for {who} needs cache room for {least * bs} tokens "
                f"to generate a single token; {cache}",
            )
        raise InvalidField(
            "max_tokens",
            f"prompt ({len(prompt_token_ids)} tokens) plus max_tokens ({params.max_tokens}) for {who} needs "
            f"cache room for {needed * bs} tokens; {cache}; lower max_tokens or leave it unset (until the "
            "context ends or the cache is full)",
        )
