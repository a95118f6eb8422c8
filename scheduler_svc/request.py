"""Request and sequence state as the scheduler tracks it (token ids only; text lives in the gateway)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import clients  # noqa: F401
from pagedserve.internal.v1 import scheduler_pb2

FinishReason = scheduler_pb2.FinishReason


class SeqStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(slots=True, eq=False)
class Request:
    """One submitted prompt. ``stream_id`` names the gateway stream that owns it."""

    request_id: str
    stream_id: int
    prompt_token_ids: list[int]
    params: scheduler_pb2.SamplingParams
    arrival: int  # admission order; lower arrived earlier
    stop_token_ids: frozenset[int]  # stop ids plus EOS unless ignore_eos
    seqs: list[Sequence] = field(default_factory=list)
    num_cached_tokens: int = 0
    num_preemptions: int = 0


@dataclass(slots=True, eq=False)
class Sequence:
    """One sample of a request. ``token_ids`` is the prompt followed by the outputs so far.

    ``num_computed_tokens`` counts tokens whose KV is in the sequence's blocks; the worker samples a
    new token in a step exactly when the step's computation reaches ``len(token_ids)``.
    """

    seq_id: int
    request: Request
    token_ids: list[int]
    index: int = 0
    num_computed_tokens: int = 0
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: int = FinishReason.FINISH_REASON_UNSPECIFIED

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


@dataclass(slots=True)
class SeqOutput:
    """What one step produced for one sequence; ``finish_reason`` set when it ended."""

    seq: Sequence
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: int = FinishReason.FINISH_REASON_UNSPECIFIED
    error: str = ""
    error_field: str = ""
