"""Checks a public GenerateRequest field by field and resolves it into what the scheduler takes.

Every failure raises InvalidField naming the field by its path in pagedserve.v1.GenerateRequest
(``sampling_params.top_p``, ``text``, ...); the gateway turns it into INVALID_ARGUMENT with a
google.rpc.BadRequest detail. Defaults of unset optional fields are resolved here, once.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import clients  # noqa: F401
from pagedserve.v1 import generation_pb2
from scheduler_svc.sampling_params import InvalidField, SamplingParams

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_REQUEST_ID_CHARS = 256
MAX_CHAT_MESSAGES = 4096
MAX_ROLE_CHARS = 64

# Scheduler-side error fields (see Scheduler.add_request) by their public path.
SCHEDULER_FIELDS = {"prompt": "prompt", "request_id": "request_id"}


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """What validation needs to know about the served model."""

    name: str
    vocab_size: int
    max_model_len: int


@dataclass(frozen=True, slots=True)
class ValidRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # stop strings stay in the gateway; to_proto() is what the scheduler gets


def public_field(scheduler_field: str) -> str:
    """The public field path of a field named in a scheduler-side rejection."""
    if scheduler_field in SCHEDULER_FIELDS:
        return SCHEDULER_FIELDS[scheduler_field]
    if scheduler_field in SamplingParams.__dataclass_fields__:
        return f"sampling_params.{scheduler_field}"
    return scheduler_field


def check_model(model: str, limits: ModelLimits) -> None:
    if model and model != limits.name:
        raise InvalidField("model", f"unknown model {model!r}; this gateway serves {limits.name!r}")


def validate(
    request: generation_pb2.GenerateRequest, limits: ModelLimits, encode: Callable[[str], list[int]]
) -> ValidRequest:
    """Validates ``request``; ``encode`` tokenizes a text prompt. Raises InvalidField."""
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidField("request_id", f"must be at most {MAX_REQUEST_ID_CHARS} characters")
    check_model(request.model, limits)
    prompt_token_ids = _prompt(request, limits, encode)
    if not request.HasField("sampling_params"):
        raise InvalidField("sampling_params.max_tokens", "is required and must be at least 1")
    params = _sampling_params(request.sampling_params, limits)
    return ValidRequest(request.request_id or uuid.uuid4().hex, prompt_token_ids, params)


def _prompt(request, limits: ModelLimits, encode) -> list[int]:
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise InvalidField("prompt", "set either text or token_ids")
    if kind == "text":
        return text_prompt(request.text, limits, encode, "text")
    return token_prompt(request.token_ids.ids, limits, "token_ids.ids")


def text_prompt(text: str, limits: ModelLimits, encode: Callable[[str], list[int]], name: str) -> list[int]:
    """A text prompt's token ids; ``name`` is the field that InvalidField names (the offline API's too)."""
    if not text:
        raise InvalidField(name, "must not be empty")
    ids = encode(text)
    if not ids:
        raise InvalidField(name, "tokenizes to no tokens")
    return _fits(ids, limits, name)


def token_prompt(ids: Sequence[int], limits: ModelLimits, name: str) -> list[int]:
    """A prompt given as token ids, checked against the vocabulary and the context length."""
    ids = list(ids)
    if not ids:
        raise InvalidField(name, "must not be empty")
    bad = next((i for i, t in enumerate(ids) if not isinstance(t, int) or not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        raise InvalidField(name, f"ids[{bad}] = {ids[bad]!r} is outside the vocabulary [0, {limits.vocab_size})")
    return _fits(ids, limits, name)


def _fits(ids: list[int], limits: ModelLimits, name: str) -> list[int]:
    if len(ids) >= limits.max_model_len:
        raise InvalidField(
            name,
            f"the prompt has {len(ids)} tokens, which leaves no room to generate within the context "
            f"length of {limits.max_model_len} tokens",
        )
    return ids


_EARLY_STOPPING = {
    generation_pb2.EARLY_STOPPING_UNSPECIFIED: False,
    generation_pb2.EARLY_STOPPING_HEURISTIC: False,
    generation_pb2.EARLY_STOPPING_ON_FULL: True,
    generation_pb2.EARLY_STOPPING_NEVER: "never",
}


def _early_stopping(value: int) -> bool | str:
    """The public enum as SamplingParams.early_stopping (transformers' False, True or "never")."""
    if value not in _EARLY_STOPPING:
        raise InvalidField("early_stopping", f"unknown value {value}")
    return _EARLY_STOPPING[value]


def validate_messages(messages: Sequence) -> list[dict]:
    """A conversation as a chat template takes it: dicts with a non-empty ``role`` and a string
    ``content`` (and an optional string ``name``), oldest first. Raises InvalidField("messages...")."""
    if not messages:
        raise InvalidField("messages", "must hold at least one message")
    if len(messages) > MAX_CHAT_MESSAGES:
        raise InvalidField("messages", f"at most {MAX_CHAT_MESSAGES} messages, got {len(messages)}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidField(f"messages[{i}]", "must be an object with a role and a content")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role or len(role) > MAX_ROLE_CHARS:
            raise InvalidField(f"messages[{i}].role", f"must be a non-empty string of at most {MAX_ROLE_CHARS} "
                               f"characters, got {role!r}")
        if not isinstance(content, str):
            raise InvalidField(f"messages[{i}].content", f"must be a string, got {type(content).__name__}")
        message = {"role": role, "content": content}
        if m.get("name") is not None:
            if not isinstance(m["name"], str):
                raise InvalidField(f"messages[{i}].name", "must be a string")
            message["name"] = m["name"]
        out.append(message)
    return out


def _sampling_params(p: generation_pb2.SamplingParams, limits: ModelLimits) -> SamplingParams:
    def opt(name: str, default: float) -> float:
        return getattr(p, name) if p.HasField(name) else default

    floats = {
        "temperature": opt("temperature", 1.0),
        "top_p": opt("top_p", 1.0),
        "min_p": p.min_p,
        "length_penalty": opt("length_penalty", 1.0),
        "repetition_penalty": opt("repetition_penalty", 1.0),
    }
    for name, value in floats.items():
        if not math.isfinite(value):
            raise InvalidField(f"sampling_params.{name}", f"must be a finite number, got {value}")
    if len(p.stop) > MAX_STOP_STRINGS:
        raise InvalidField("sampling_params.stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(p.stop)}")
    if any(len(s) > MAX_STOP_STRING_CHARS for s in p.stop):
        raise InvalidField("sampling_params.stop", f"each stop string must be at most {MAX_STOP_STRING_CHARS} "
                           "characters")
    bad = next((t for t in p.stop_token_ids if t >= limits.vocab_size), None)
    if bad is not None:
        raise InvalidField("sampling_params.stop_token_ids",
                           f"token id {bad} is outside the vocabulary [0, {limits.vocab_size})")
    try:
        params = SamplingParams(
            max_tokens=p.max_tokens,
            top_k=p.top_k,
            seed=p.seed if p.HasField("seed") else None,
            stop=tuple(p.stop),
            stop_token_ids=tuple(p.stop_token_ids),
            ignore_eos=p.ignore_eos,
            n=p.n if p.HasField("n") else 1,
            beam_width=max(p.beam_width, 1),
            logprobs=p.logprobs or p.top_logprobs > 0,
            top_logprobs=p.top_logprobs,
            early_stopping=_early_stopping(p.early_stopping),
            **floats,
        )
    except InvalidField as exc:
        raise InvalidField(f"sampling_params.{exc.field}", str(exc)[len(exc.field) + 2 :]) from None
    return params
