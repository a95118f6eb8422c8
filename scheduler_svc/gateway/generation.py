"""One request's life in the gateway, independent of the transport that carries it.

``GenerationCore.generate`` validates a public GenerateRequest, submits its token ids to an engine (the
pool's router picks it), turns the scheduler's per-step outputs into GenerateResponses (one SampleStream per
sample: detokenization, stop strings, coalescing) and yields them in batches; whatever ends the
iteration (the last sample finished, an error, the consumer going away) releases the request, and an
unfinished one is aborted upstream so its KV blocks are freed within a step. The gRPC servicer writes
the batches to its stream; the HTTP front end turns them into OpenAI-shaped JSON. Failures are
``GenerationFailed`` with a gRPC status code; the transports map it to their own form.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

import clients  # noqa: F401
from gpu_worker import log
from gpu_worker.sampling_params import InvalidField
from pagedserve.internal.v1 import scheduler_pb2
from pagedserve.v1 import generation_pb2
from scheduler_svc.finish_reason import FinishReason
from scheduler_svc.gateway.detokenizer import byte_fallback_ids
from scheduler_svc.gateway.engines import EnginePool
from scheduler_svc.gateway.metrics import GatewayMetrics
from scheduler_svc.gateway.options import DEFAULT_LIMITS, GatewayLimits
from scheduler_svc.gateway.response_stream import SampleStream, prompt_token_logprobs, stop_token_ids
from scheduler_svc.gateway.scheduler_link import DuplicateRequest, LinkDown, LinkLost
from scheduler_svc.gateway.tokenizer import Tokenizer
from scheduler_svc.gateway.tokenizer_pool import RETRY_AFTER_S, TokenizerBusy, TokenizerPool
from scheduler_svc.gateway.validation import (
    ModelLimits,
    ValidRequest,
    check_model,
    check_request,
    check_text,
    public_field,
    text_token_ids,
)

SHUTDOWN = object()  # queued to requests still running when the drain period is over


class GenerationFailed(Exception):
    """Ends a request with a status; ``field`` names the offending request field (INVALID_ARGUMENT);
    ``retry_after_s`` tells a refused client when to try again (RESOURCE_EXHAUSTED)."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str = "",
                 retry_after_s: float | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.code, self.message, self.field, self.retry_after_s = code, message, field, retry_after_s
        self.reason = reason  # with ``field``: the message without its "field: " prefix (OpenAI renames fields)

    @classmethod
    def invalid(cls, field: str, reason: str) -> GenerationFailed:
        """INVALID_ARGUMENT naming ``field``, as InvalidField formats it."""
        return cls(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {reason}", field, reason=reason)


@dataclass(slots=True)
class RequestSummary:
    """What the request log line says about one request."""

    request_id: str = "-"
    status: str = "OK"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""
    finish_reason: str = ""
    time_to_first_token_s: float | None = None
    engine: str = ""  # the engine that served it


class GenerationCore:
    """Validation, submission and response streams of the gateway's requests."""

    def __init__(self, tokenizer: Tokenizer, model_name: str, engines: EnginePool,
                 metrics: GatewayMetrics | None = None, gateway_limits: GatewayLimits = DEFAULT_LIMITS) -> None:
        self.tokenizer = tokenizer
        self.byte_token_ids = byte_fallback_ids(tokenizer.id_to_token, tokenizer.vocab_size)
        self.gateway_limits = gateway_limits
        self.max_token_bytes = tokenizer.max_token_bytes  # read once, at start: it scans the vocabulary
        self.tokenizer_pool = TokenizerPool(tokenizer, gateway_limits.tokenizer_threads,
                                            gateway_limits.max_queued_tokenizations)
        self.model_name = model_name
        self.engines = engines
        self.metrics = metrics or GatewayMetrics(model_name)
        self.info: scheduler_pb2.EngineInfo | None = None  # set by the watcher once the scheduler is ready
        self.draining = False
        self.num_active = 0
        self._log = log.get_logger()

    @property
    def limits(self) -> ModelLimits:
        if self.info is None or not self.engines.connected:
            raise GenerationFailed(grpc.StatusCode.UNAVAILABLE, "the scheduler is not ready")
        return ModelLimits(self.model_name, self.info.vocab_size, self.info.max_model_len, self.max_token_bytes,
                           self.gateway_limits, self.info.num_blocks, self.info.block_size)

    async def validate(self, request: generation_pb2.GenerateRequest) -> ValidRequest:
        """Every check first (cheap, bounded by the request's size), then the text's tokens, counted."""
        limits = self.limits
        try:
            checked = check_request(request, limits)
            if checked.text is not None:
                ids = text_token_ids(await self.encode(checked.text), limits, "text", checked.truncate_prompt_tokens)
                return checked.resolve(ids, limits, "text")
            return checked.resolve(checked.prompt_token_ids, limits, "token_ids.ids")
        except InvalidField as exc:
            raise GenerationFailed.invalid(exc.field, exc.reason) from None

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids through the bounded tokenizer pool (long texts off the event loop)."""
        try:
            return await self.tokenizer_pool.encode(text, add_special_tokens)
        except TokenizerBusy as exc:
            raise GenerationFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), retry_after_s=RETRY_AFTER_S) from None

    async def generate(
        self, request: generation_pb2.GenerateRequest, cancel_status: Callable[[], str] | None = None
    ) -> AsyncIterator[list[generation_pb2.GenerateResponse]]:
        """Yields the responses that are ready, in batches (coalesced while the consumer was busy).
        ``cancel_status`` names a cancellation in the request log (CANCELLED, DEADLINE_EXCEEDED)."""
        summary = RequestSummary()
        start = time.monotonic()
        timer = self.metrics.timer()
        self.num_active += 1
        self.metrics.in_flight.inc()
        samples: dict[int, SampleStream] = {}
        request_id = request.request_id
        submitted = False
        try:
            if self.draining:
                raise GenerationFailed(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down")
            valid = await self.validate(request)
            request_id = summary.request_id = valid.request_id
            summary.prompt_tokens = len(valid.prompt_token_ids)
            new_sample = self._sample_factory(valid.params, valid.prompt_token_ids, valid.include_stop_str_in_output)
            # n samples stream side by side; beams join as the search reports them (all in its last step).
            samples = {i: new_sample(i) for i in range(valid.params.n)}
            queue = self._submit(valid)
            submitted = True
            usage = generation_pb2.Usage(prompt_tokens=len(valid.prompt_token_ids))
            new_beam = new_sample if valid.params.beam_width > 1 else None
            while not all(s.sent_final for s in samples.values()):
                items = [await queue.get()]
                while not queue.empty():  # coalesce whatever arrived while the consumer was writing
                    items.append(queue.get_nowait())
                for item in items:
                    self._apply(item, samples, usage, new_beam)
                if summary.time_to_first_token_s is None and any(s.num_tokens for s in samples.values()):
                    summary.time_to_first_token_s = round(time.monotonic() - start, 6)
                batch = [r for s in samples.values() if (r := s.take_response(request_id, usage)) is not None]
                if batch:
                    timer.tokens(sum(s.num_tokens for s in samples.values()))
                    yield batch
        except GenerationFailed as exc:
            summary.status, summary.error = exc.code.name, exc.message
            raise
        except (asyncio.CancelledError, GeneratorExit):
            summary.status = cancel_status() if cancel_status is not None else "CANCELLED"
            raise
        except Exception as exc:  # a bug that this request's data reached (detokenizing, a stop check...)
            failed = GenerationFailed(grpc.StatusCode.INTERNAL,
                                      f"the gateway could not process this request: {log.describe_exception(exc)}")
            summary.status, summary.error = failed.code.name, failed.message
            self._log.error("request failed in the gateway", request_id=summary.request_id or "-", exc_info=exc)
            raise failed from exc
        finally:
            self.num_active -= 1
            self.metrics.in_flight.dec()
            if submitted:
                summary.engine = self.engines.release(
                    request_id, abort=not all(s.upstream_finished for s in samples.values()))
            self._summarize(summary, start, samples)

    def _submit(self, valid: ValidRequest) -> asyncio.Queue:
        try:
            return self.engines.submit(valid.request_id, valid.prompt_token_ids, valid.params.to_proto())
        except LinkDown as exc:
            raise GenerationFailed(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        except DuplicateRequest:
            raise GenerationFailed(grpc.StatusCode.ALREADY_EXISTS,
                                   f"request {valid.request_id!r} is already running") from None

    def _sample_factory(self, params, prompt_token_ids: list[int], include_stop_str: bool = False
                        ) -> Callable[[int], SampleStream]:
        assert self.info is not None
        stop_ids = stop_token_ids(params, self.info.eos_token_ids)
        backend = getattr(self.tokenizer, "backend", None)  # without one: the window decoder
        return lambda index: SampleStream(index, params, self.tokenizer.decode, stop_ids, self.byte_token_ids,
                                          backend, prompt_token_ids=prompt_token_ids, include_stop_str=include_stop_str)

    def _apply(self, item, samples: dict[int, SampleStream], usage: generation_pb2.Usage, new_beam=None) -> None:
        if isinstance(item, LinkLost):
            raise GenerationFailed(grpc.StatusCode.UNAVAILABLE, f"lost the scheduler: {item.reason}")
        if item is SHUTDOWN:
            for s in samples.values():
                s.finish(generation_pb2.FINISH_REASON_ABORT)
            return
        if item.finish_reason == FinishReason.ERROR:
            for s in samples.values():
                s.upstream_finished = True  # a failed request holds nothing in the scheduler
            raise scheduler_error(item)
        sample = samples.get(item.index)
        if sample is None:
            if new_beam is None:
                return
            sample = samples[item.index] = new_beam(item.index)
        usage.cached_prompt_tokens = item.num_cached_tokens
        if item.HasField("prompt_logprobs"):  # index 0 computes the prompt for all: every sample returns it
            lps = prompt_token_logprobs(item.prompt_logprobs, sample.prompt_token_ids, sample.decode)
            for s in samples.values():
                s.prompt_logprobs += lps
        sample.feed(item)

    def _summarize(self, summary: RequestSummary, start: float, samples: dict[int, SampleStream]) -> None:
        summary.completion_tokens = sum(s.num_tokens for s in samples.values())
        reasons = [FinishReason.of_public(s.finish_reason).label for s in samples.values() if s.finished]
        if reasons:
            summary.finish_reason = reasons[0] if len(reasons) == 1 else ",".join(reasons)
        fields = {k: v for k, v in (
            ("status", summary.status), ("prompt_tokens", summary.prompt_tokens),
            ("completion_tokens", summary.completion_tokens), ("error", summary.error),
            ("finish_reason", summary.finish_reason), ("time_to_first_token_s", summary.time_to_first_token_s),
            ("engine", summary.engine),
        ) if v not in ("", None)}
        total_s = time.monotonic() - start
        self._log.info("request finished", request_id=summary.request_id or "-", total_s=round(total_s, 6), **fields)
        self.metrics.finished(summary.engine, summary.status, summary.prompt_tokens, summary.completion_tokens,
                              total_s)

    # ---- unary

    async def tokenize(self, text: str, model: str = "") -> list[int]:
        """The Tokenize RPC: the model named (if any) and the text's size checked first."""
        limits = ModelLimits(self.model_name, self.tokenizer.vocab_size, 0, None, self.gateway_limits)
        try:
            check_model(model, limits)
            if text:
                check_text(text, limits, "text")
        except InvalidField as exc:
            raise GenerationFailed.invalid(exc.field, exc.reason) from None
        return await self.encode(text) if text else []


_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def scheduler_error(out: scheduler_pb2.RequestOutput) -> GenerationFailed:
    """A FINISH_REASON_ERROR output as a status: the scheduler's status code when it sent one, else a
    named field is the caller's fault and anything else an internal error."""
    retry_after_s = out.retry_after_ms / 1000 if out.retry_after_ms else None
    if out.error_field:
        return GenerationFailed.invalid(public_field(out.error_field), out.error)
    if out.status_code and out.status_code in _STATUS_BY_NUMBER:
        return GenerationFailed(_STATUS_BY_NUMBER[out.status_code], out.error, retry_after_s=retry_after_s)
    return GenerationFailed(grpc.StatusCode.INTERNAL, out.error or "the scheduler failed the request")
