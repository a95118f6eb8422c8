"""The OpenAI-compatible API's JSON, transport aside: request bodies checked and turned into public
SamplingParams, GenerateResponses turned into completion and chat choices (whole or as stream chunks),
and failures into OpenAI's error object with its HTTP status.

Field names follow OpenAI's API reference. Beyond it we take vLLM's common extensions (top_k, min_p,
repetition_penalty, ignore_eos, stop_token_ids; min_tokens, the penalties, logit_bias, prompt_logprobs
and echo are in openai_sampling). What we cannot honour is refused with 400 rather than ignored: suffix,
best_of other than n, tools, and a response_format other than text.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

import clients  # noqa: F401
from gpu_worker.sampling_params import InvalidField
from pagedserve.v1 import generation_pb2
from scheduler_svc.finish_reason import FinishReason
from scheduler_svc.gateway import structured
from scheduler_svc.gateway.context_window import is_context_error
from scheduler_svc.gateway.generation import GenerationFailed
from scheduler_svc.gateway.validation import shown

UINT32_MAX = 2**32 - 1
MIN_LOGPROB = -9999.0  # what a log probability of zero is reported as (JSON has no -Infinity)
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

# gRPC status -> HTTP status and OpenAI error type.
_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "invalid_request_error"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "server_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error"),
}


class ApiError(Exception):
    """A failed request as OpenAI reports it: HTTP status and {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def invalid(cls, param: str, message: str) -> ApiError:
        return cls(400, f"{param}: {message}", param, "invalid_argument")

    @classmethod
    def from_failure(cls, exc: GenerationFailed, params: dict[str, str]) -> ApiError:
        """``params`` renames the public proto's field paths to this endpoint's parameters."""
        status, type_ = _HTTP.get(exc.code, (500, "server_error"))
        param = openai_param(exc.field, params) if exc.field else None
        message = exc.message
        if param and exc.field and exc.reason:
            message = f"{param}: {exc.reason}"
        # OpenAI's code for an over-long request, which LangChain maps to its context overflow error
        code = "context_length_exceeded" if is_context_error(message) else exc.code.name.lower()
        return cls(status, message, param, code, type_)


def openai_param(field_path: str, renames: dict[str, str]) -> str:
    """The request parameter behind a GenerateRequest field path (sampling_params.top_p -> top_p)."""
    if field_path in renames:
        return renames[field_path]
    return field_path.removeprefix("sampling_params.")


# ---- request bodies


def _value(body: dict, name: str, kinds: tuple[type, ...], what: str):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ApiError.invalid(name, f"must be {what}, got {shown(value)}")
    return value


def int_param(body: dict, name: str, lo: int = 0, hi: int = UINT32_MAX) -> int | None:
    value = _value(body, name, (int,), "an integer")
    if value is not None and not lo <= value <= hi:
        raise ApiError.invalid(name, f"must be in [{lo}, {hi}], got {value}")
    return value


def float_param(body: dict, name: str) -> float | None:
    value = _value(body, name, (int, float), "a number")
    if value is not None and not math.isfinite(value):
        raise ApiError.invalid(name, f"must be a finite number, got {value}")
    return None if value is None else float(value)


def bool_param(body: dict, name: str) -> bool:
    return bool(_value(body, name, (bool,), "true or false"))


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise ApiError.invalid("stop", "must be a string or a list of strings")


def _refuse_unsupported(body: dict) -> None:
    if body.get("tools") or body.get("functions"):
        raise ApiError.invalid("tools", "tool calling is not supported")


def sampling_params(body: dict, max_tokens: int | None, logprobs: bool, top_logprobs: int
                    ) -> generation_pb2.SamplingParams:
    """The body's sampling parameters (common to both endpoints) as the public proto."""
    _refuse_unsupported(body)
    p = generation_pb2.SamplingParams(stop=_stop(body), logprobs=logprobs, top_logprobs=top_logprobs,
                                      ignore_eos=bool_param(body, "ignore_eos"))
    if max_tokens is not None:
        p.max_tokens = max_tokens
    for name in ("temperature", "top_p", "repetition_penalty"):
        if (value := float_param(body, name)) is not None:
            setattr(p, name, value)
    p.min_p = float_param(body, "min_p") or 0.0
    p.top_k = _top_k(body)
    if (n := int_param(body, "n")) is not None:
        p.n = n
    if (seed := int_param(body, "seed", 0, 2**64 - 1)) is not None:
        p.seed = seed
    stop_ids = body.get("stop_token_ids") or []
    if not (isinstance(stop_ids, list) and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= UINT32_MAX
                                               for t in stop_ids)):
        raise ApiError.invalid("stop_token_ids", "must be a list of token ids")
    p.stop_token_ids.extend(stop_ids)
    try:  # response_format, structured_outputs, guided_*: the output constraint (structured.py)
        structured.set_from_body(body, p)
    except InvalidField as exc:
        raise ApiError.invalid(exc.field, str(exc)[len(exc.field) + 2:]) from None
    return p


def _top_k(body: dict) -> int:
    top_k = _value(body, "top_k", (int,), "an integer")
    if top_k is None or top_k == -1:  # -1: off, as in vLLM
        return 0
    if not 0 <= top_k <= UINT32_MAX:
        raise ApiError.invalid("top_k", f"must be -1, 0 (off) or positive, got {top_k}")
    return top_k


def max_tokens_of(body: dict) -> int | None:
    """max_completion_tokens (chat's current name) or max_tokens."""
    value = int_param(body, "max_completion_tokens", 0)
    return value if value is not None else int_param(body, "max_tokens", 0)


@dataclass(frozen=True, slots=True)
class StreamOptions:
    stream: bool
    include_usage: bool
    continuous_usage_stats: bool = False  # vLLM: usage so far in every chunk


def stream_options(body: dict) -> StreamOptions:
    stream = bool_param(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return StreamOptions(stream, False)
    if not isinstance(options, dict):
        raise ApiError.invalid("stream_options", "must be an object")
    if not stream:  # as vLLM: options of a stream that is not asked for are a mistake, not a no-op
        raise ApiError.invalid("stream_options", "is allowed only with stream: true")
    unknown = sorted(set(options) - {"include_usage", "continuous_usage_stats", "include_obfuscation"})
    if unknown:
        raise ApiError.invalid(f"stream_options.{unknown[0]}", "is not supported")
    flags = {}
    for name in ("include_usage", "continuous_usage_stats", "include_obfuscation"):
        flags[name] = options.get(name)
        if flags[name] is not None and not isinstance(flags[name], bool):
            raise ApiError.invalid(f"stream_options.{name}", f"must be true or false, got {flags[name]!r}")
    # include_obfuscation (OpenAI's padding of stream events against length side channels) pads nothing
    # here; false or unset asks for exactly that.
    if flags["include_obfuscation"]:
        raise ApiError.invalid("stream_options.include_obfuscation", "is not supported (no padding is sent)")
    return StreamOptions(stream, stream and bool(flags["include_usage"]),
                         stream and bool(flags["include_usage"]) and bool(flags["continuous_usage_stats"]))


def completion_prompts(body: dict) -> list[str | list[int]]:
    """prompt: a string, a list of strings, a list of token ids, or a list of lists of token ids."""
    prompt = body.get("prompt")

    def is_ids(x) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(prompt, str):
        return [prompt]
    if is_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
        return prompt
    raise ApiError.invalid("prompt", "must be a string, a list of strings, a list of token ids or a list of such lists")


def check_completion_extras(body: dict) -> None:
    if body.get("suffix"):
        raise ApiError.invalid("suffix", "is not supported")
    n = int_param(body, "n")  # n's own type first: a bad n is n's error, not best_of's
    best_of = int_param(body, "best_of", 1)
    if best_of is not None and best_of != (n or 1):
        raise ApiError.invalid("best_of", "must equal n (the server returns every sample it draws)")


def chat_messages(body: dict) -> list[dict]:
    """messages as a chat template takes them: text parts of a content list joined by newlines."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise ApiError.invalid("messages", "must be a list of messages")
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            parts = m["content"]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in parts):
                raise ApiError.invalid(f"messages[{i}].content", "only text content parts are supported")
            m = dict(m, content="\n".join(p["text"] for p in parts))
        out.append(m)
    return out


# ---- responses


def finish_reason(value: int) -> str | None:
    """The OpenAI finish_reason of a public one; None while the sample runs."""
    return FinishReason.of_public(value).label or None


@dataclass(slots=True)
class Choice:
    """What a choice has gathered so far (whole responses) or sent so far (streams)."""

    text: list[str] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    text_offset: int = 0  # completions' logprobs: characters of token text so far
    started: bool = False  # chat streams: the role chunk went out


@dataclass(slots=True)
class Usage:
    """Token counts over the whole request: each prompt once, every choice's completion."""

    prompt_tokens: dict[int, int] = field(default_factory=dict)  # by prompt index
    cached_tokens: dict[int, int] = field(default_factory=dict)
    completion_tokens: int = 0

    def add(self, prompt_index: int, resp: generation_pb2.GenerateResponse) -> None:
        if resp.HasField("usage"):
            self.prompt_tokens[prompt_index] = resp.usage.prompt_tokens
            self.cached_tokens[prompt_index] = resp.usage.cached_prompt_tokens
            self.completion_tokens += resp.usage.completion_tokens

    def body(self) -> dict:
        prompt = sum(self.prompt_tokens.values())
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": sum(self.cached_tokens.values())}}


class LogprobFormat:
    """Token log probabilities in either endpoint's shape; ``token_text`` spells one token."""

    def __init__(self, token_text: Callable[[int], str], chat: bool) -> None:
        self.token_text = token_text
        self.chat = chat

    def chat_entries(self, logprobs) -> list[dict]:
        def entry(token_id: int, logprob: float) -> dict:
            text = self.token_text(token_id)
            return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode())}

        return [dict(entry(lp.token_id, lp.logprob), top_logprobs=[entry(t.token_id, t.logprob) for t in lp.top])
                for lp in logprobs]

    def completion_body(self, logprobs, choice: Choice) -> dict:
        """{tokens, token_logprobs, top_logprobs, text_offset} of these tokens; advances the offset."""
        tokens, offsets = [], []
        for lp in logprobs:
            tokens.append(self.token_text(lp.token_id))
            offsets.append(choice.text_offset)
            choice.text_offset += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": [_finite(lp.logprob) for lp in logprobs],
                "top_logprobs": [{self.token_text(t.token_id): _finite(t.logprob) for t in lp.top} for lp in logprobs],
                "text_offset": offsets}

    def merge_completion(self, bodies: list[dict]) -> dict:
        return {key: [x for b in bodies for x in b[key]] for key in ("tokens", "token_logprobs", "top_logprobs",
                                                                      "text_offset")}


def _finite(logprob: float) -> float:
    return logprob if logprob >= MIN_LOGPROB else MIN_LOGPROB
