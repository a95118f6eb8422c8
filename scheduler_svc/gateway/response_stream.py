"""From the scheduler's RequestOutputs to the public GenerateResponses of one request.

Per sample: token ids pass through, text comes from the incremental detokenizer, stop strings and
stop tokens end the sample here (the text of either is never emitted), and everything that arrived
since the last response is coalesced into the next one. A beam is known only when the search ends
(beams are re-selected every step), so each beam arrives whole, as its final_token_ids.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import clients  # noqa: F401
from gpu_worker.sampling_params import SamplingParams
from pagedserve.internal.v1 import scheduler_pb2
from pagedserve.v1 import generation_pb2
from scheduler_svc.finish_reason import FinishReason
from scheduler_svc.gateway.detokenizer import Decode, IncrementalDetokenizer, StopStrings


def stop_token_ids(params: SamplingParams, eos_token_ids: Iterable[int]) -> frozenset[int]:
    """The tokens that end a sample: the request's stop tokens and, unless ignore_eos, the model's EOS."""
    return frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(eos_token_ids))


@dataclass(slots=True)
class SampleStream:
    """One sample (index) of a request: its detokenizer, its stop strings and what is not yet sent."""

    index: int
    params: SamplingParams
    decode: Decode
    stop_token_ids: frozenset[int]  # stop_token_ids, plus the model's EOS unless ignore_eos
    byte_token_ids: frozenset[int] = frozenset()  # byte-fallback tokens of the vocabulary
    backend: object = None  # the tokenizers.Tokenizer behind ``decode``: streaming detokenization in Rust
    prompt_token_ids: list[int] = field(default_factory=list)  # for prompt logprobs (params.prompt_logprobs)
    include_stop_str: bool = False  # the stop string that ends the sample stays in its text
    num_tokens: int = 0
    finish_reason: int = generation_pb2.FINISH_REASON_UNSPECIFIED
    upstream_finished: bool = False  # the scheduler reported the end (else it must be told: Abort)
    sent_final: bool = False
    detok: IncrementalDetokenizer = field(init=False)
    stops: StopStrings = field(init=False)
    # Not yet sent:
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[generation_pb2.TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[generation_pb2.TokenLogprob] = field(default_factory=list)  # sent with the first

    def __post_init__(self) -> None:
        self.detok = IncrementalDetokenizer(self.decode, self.byte_token_ids, self.backend)
        self.stops = StopStrings(self.params.stop, self.include_stop_str)

    @property
    def finished(self) -> bool:
        return self.finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED

    def feed(self, out: scheduler_pb2.RequestOutput) -> None:
        """Takes one step's output for this sample (not an error: those end the whole request)."""
        reason = out.finish_reason
        if reason:
            self.upstream_finished = True
        if self.finish_reason:  # ended here by a stop string or stop token; later tokens are dropped
            return
        beam = self.params.beam_width > 1
        token_ids = out.final_token_ids if beam else out.token_ids
        num_logprobs = 0 if beam else len(out.logprobs)
        stops = self.stops if self.stops.stops else None
        for i, token_id in enumerate(token_ids):
            self.num_tokens += 1
            self.token_ids.append(token_id)
            if i < num_logprobs:
                self.logprobs.append(_token_logprob(out, i, self.decode))
            # As vLLM: stop tokens end a sample from min_tokens outputs on, stop strings after that many.
            min_tokens = self.params.min_tokens
            if token_id in self.stop_token_ids and self.num_tokens >= min_tokens:  # counted, text not emitted
                self.finish(generation_pb2.FINISH_REASON_STOP)
                return
            text = self.detok.add(token_id)
            if stops is not None and self.num_tokens > min_tokens:
                text, hit = stops.add(text)
                if hit:
                    self.text.append(text)
                    self.finish_reason = generation_pb2.FINISH_REASON_STOP
                    return
            if text:
                self.text.append(text)
            if self.num_tokens >= self.params.max_tokens:
                self.finish(generation_pb2.FINISH_REASON_LENGTH)
                return
        if reason:
            self.finish(FinishReason(reason).public)

    def finish(self, reason: int) -> None:
        """Ends the sample: releases held-back text (unless it completes a stop string)."""
        if self.finished:
            return
        text, hit = self.stops.add(self.detok.flush())
        self.text.append(text if hit else text + self.stops.flush())
        self.finish_reason = generation_pb2.FINISH_REASON_STOP if hit else reason

    def take_response(self, request_id: str, usage: generation_pb2.Usage) -> generation_pb2.GenerateResponse | None:
        """The response carrying everything not yet sent, or None when there is nothing to send."""
        text = "".join(self.text)
        final = self.finished and not self.sent_final
        if not (self.token_ids or text or final):
            return None  # prompt logprobs wait for the first token: they are complete by then
        resp = generation_pb2.GenerateResponse(
            request_id=request_id, index=self.index, token_ids=self.token_ids, text=text, logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
        )
        self.prompt_logprobs = []
        if final:
            resp.finish_reason = self.finish_reason
            resp.usage.CopyFrom(usage)
            resp.usage.completion_tokens = self.num_tokens
            self.sent_final = True
        self.token_ids, self.text, self.logprobs = [], [], []
        return resp


def _token_logprob(out: scheduler_pb2.RequestOutput, i: int, decode: Decode) -> generation_pb2.TokenLogprob:
    """Token i's log probability and alternatives, each with its text (clients show it beside the id)."""
    token_id = out.token_ids[i]
    lp = generation_pb2.TokenLogprob(token_id=token_id, logprob=out.logprobs[i], text=decode([token_id]))
    if i < len(out.top_logprobs):
        top = out.top_logprobs[i]
        for alt_id, logprob in zip(top.token_ids, top.logprobs, strict=False):
            lp.top.add(token_id=alt_id, logprob=logprob, text=decode([alt_id]))
    return lp


def prompt_token_logprobs(p: scheduler_pb2.PromptLogprobs, prompt_token_ids: list[int], decode: Decode
                          ) -> list[generation_pb2.TokenLogprob]:
    """The public form of prompt positions first_position.. (token ids from the prompt), with texts."""
    out = []
    for j, (logprob, rank) in enumerate(zip(p.logprobs, p.ranks, strict=True)):
        token_id = prompt_token_ids[p.first_position + j]
        lp = generation_pb2.TokenLogprob(token_id=token_id, logprob=logprob, rank=rank, text=decode([token_id]))
        if j < len(p.top):
            for alt_id, top_lp in zip(p.top[j].token_ids, p.top[j].logprobs, strict=False):
                lp.top.add(token_id=alt_id, logprob=top_lp, text=decode([alt_id]))
        out.append(lp)
    return out
