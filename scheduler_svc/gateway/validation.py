"""Checks a public GenerateRequest field by field and resolves it into what the scheduler takes.

Every failure raises InvalidField naming the field by its path in pagedserve.v1.GenerateRequest
(``sampling_params.top_p``, ``text``, ...); the gateway turns it into INVALID_ARGUMENT with a
google.rpc.BadRequest detail. Defaults of unset optional fields are resolved here, once.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import clients  # noqa: F401
from gpu_worker.sampling_params import EarlyStopping, InvalidField, SamplingParams
from pagedserve.v1 import generation_pb2
from scheduler_svc.gateway.context_window import check_prompt_fits, resolve_max_tokens
from scheduler_svc.gateway.options import DEFAULT_LIMITS, GatewayLimits
from scheduler_svc.gateway.structured import constraint_of

MAX_REQUEST_ID_CHARS = 256
# No token spans more text than this many times its vocabulary entry's UTF-8 length (pre-tokenizers
# that drop separators, normalizers that shorten text): the slack of the prompt's byte bound.
TOKEN_BYTES_SLACK = 4
MAX_CHAT_MESSAGES = 4096
MAX_ROLE_CHARS = 64

# A client's value quoted in an error message: at most this many characters of it (a 4,000-character
# model name echoed whole made gRPC's status trailer too large, and the client saw RESOURCE_EXHAUSTED).
MAX_SHOWN_CHARS = 80


def shown(value) -> str:
    """A client's value as an error message quotes it: its repr, clipped; a container only by its size
    (its repr could be large, or nested deeper than repr recurses)."""
    if isinstance(value, list | tuple | dict):
        return f"a {type(value).__name__} of {len(value)} items"
    text = repr(value)
    if len(text) <= MAX_SHOWN_CHARS:
        return text
    return f"{text[:MAX_SHOWN_CHARS - 1]}… ({len(value) if isinstance(value, str) else len(text)} characters)"


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """What validation needs to know about the served model, and the gateway's bounds."""

    name: str
    vocab_size: int
    max_model_len: int
    max_token_bytes: int | None = None  # UTF-8 length of the longest vocabulary entry, when known
    gateway: GatewayLimits = DEFAULT_LIMITS
    num_blocks: int = 0  # the engine's KV pool, for n > 1 without max_tokens (0: unknown)
    block_size: int = 0

    @property
    def max_prompt_bytes(self) -> int:
        """The longest text prompt worth tokenizing: a longer one is refused without looking at it."""
        bound = self.gateway.max_prompt_bytes
        if self.max_token_bytes:
            bound = min(bound, TOKEN_BYTES_SLACK * self.max_token_bytes * self.max_model_len)
        return bound


@dataclass(frozen=True, slots=True)
class ValidRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # stop strings stay in the gateway; to_proto() is what the scheduler gets
    include_stop_str_in_output: bool = False  # a gateway matter: the stop string stays in the text


@dataclass(frozen=True, slots=True)
class CheckedRequest:
    """A request whose every field is checked except the text prompt's tokens (not yet counted)."""

    request_id: str
    params: SamplingParams
    text: str | None  # the prompt to tokenize, or None when it came as token ids
    prompt_token_ids: list[int] | None
    max_tokens_set: bool = True  # False: max_tokens is resolved to the context's end once the prompt is known
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last N tokens

    def resolve(self, ids: list[int], limits: ModelLimits, name: str) -> ValidRequest:
        """The valid request of this checked one and its prompt's token ids (truncated if asked)."""
        if self.truncate_prompt_tokens is not None:
            ids = ids[-self.truncate_prompt_tokens:]
        check_prompt_fits(len(ids), limits.max_model_len, name)
        try:
            params = resolve_max_tokens(self.params, self.max_tokens_set, len(ids), limits.max_model_len,
                                        limits.num_blocks, limits.block_size)
        except InvalidField as exc:
            raise InvalidField(f"sampling_params.{exc.field}", str(exc)[len(exc.field) + 2:]) from None
        return ValidRequest(self.request_id, ids, params, self.include_stop_str_in_output)


def public_field(scheduler_field: str) -> str:
    """The public field path of a field named in a scheduler-side rejection."""
    # Request-level fields (prompt, request_id) have the same path in both; sampling fields sit one
    # level down in the public request.
    if scheduler_field in SamplingParams.__dataclass_fields__:
        return f"sampling_params.{scheduler_field}"
    return scheduler_field


def check_model(model: str, limits: ModelLimits) -> None:
    if model and model != limits.name:
        raise InvalidField("model", f"unknown model {shown(model)}; this gateway serves {limits.name!r}")


def check_request(request: generation_pb2.GenerateRequest, limits: ModelLimits) -> CheckedRequest:
    """Every check that needs no tokenizer, in the order a client reads the fields. Raises InvalidField.
    Cheap: bounded by the request's size, whatever it holds."""
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidField("request_id", f"must be at most {MAX_REQUEST_ID_CHARS} characters")
    check_model(request.model, limits)
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise InvalidField("prompt", "set either text or token_ids")
    p = request.sampling_params
    truncate = _truncate_prompt_tokens(p, limits)
    text, ids = None, None
    if kind == "text":
        # A prompt to truncate may be longer than the context: only the gateway's byte cap bounds it.
        text = check_text(request.text, limits if truncate is None else replace(limits, max_token_bytes=None), "text")
    else:
        ids = request.token_ids.ids
        ids = token_prompt(ids if truncate is None else ids[-truncate:], limits, "token_ids.ids")
    params = _sampling_params(p, limits)
    return CheckedRequest(request.request_id or uuid.uuid4().hex, params, text, ids, p.HasField("max_tokens"),
                          p.include_stop_str_in_output, truncate)


def _truncate_prompt_tokens(p: generation_pb2.SamplingParams, limits: ModelLimits) -> int | None:
    if not p.HasField("truncate_prompt_tokens"):
        return None
    k = p.truncate_prompt_tokens
    if not 1 <= k < limits.max_model_len:
        raise InvalidField("sampling_params.truncate_prompt_tokens",
                           f"must be in [1, {limits.max_model_len - 1}] (below the context length), got {k}")
    return k


def check_text(text: str, limits: ModelLimits, name: str) -> str:
    """A text prompt that is worth tokenizing: not empty, not longer than any prompt that fits."""
    if not text:
        raise InvalidField(name, "must not be empty")
    bound = limits.max_prompt_bytes
    # UTF-8 takes at least one byte per character: a short enough string needs no encoding to pass.
    if len(text) > bound or (4 * len(text) > bound and len(text.encode("utf-8", "surrogatepass")) > bound):
        num_bytes = len(text.encode("utf-8", "surrogatepass"))
        why = ("--max-prompt-bytes" if bound == limits.gateway.max_prompt_bytes
               else f"more than a context of {limits.max_model_len} tokens can hold")
        raise InvalidField(name, f"is {num_bytes} bytes long; the limit is {bound} bytes ({why})")
    return text


def text_token_ids(ids: list[int], limits: ModelLimits, name: str, truncate: int | None = None) -> list[int]:
    """The token ids of a checked text prompt (its last ``truncate`` if set), counted against the context."""
    if not ids:
        raise InvalidField(name, "tokenizes to no tokens")
    if truncate is not None:
        ids = ids[-truncate:]
    check_prompt_fits(len(ids), limits.max_model_len, name)
    return ids


def text_prompt(text: str, limits: ModelLimits, encode: Callable[[str], list[int]], name: str) -> list[int]:
    """A text prompt's token ids; ``name`` is the field that InvalidField names (the offline API's too)."""
    return text_token_ids(encode(check_text(text, limits, name)), limits, name)


def token_prompt(ids: Sequence[int], limits: ModelLimits, name: str) -> list[int]:
    """A prompt given as token ids, checked against the context length (first: it bounds the scan) and
    the vocabulary."""
    if not len(ids):
        raise InvalidField(name, "must not be empty")
    check_prompt_fits(len(ids), limits.max_model_len, name)
    ids = list(ids)
    bad = next((i for i, t in enumerate(ids) if not isinstance(t, int) or not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        raise InvalidField(name, f"ids[{bad}] = {ids[bad]!r} is outside the vocabulary [0, {limits.vocab_size})")
    return ids




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
                               f"characters, got {shown(role)}")
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
        "presence_penalty": p.presence_penalty,
        "frequency_penalty": p.frequency_penalty,
    }
    for name, value in floats.items():
        if not math.isfinite(value):
            raise InvalidField(f"sampling_params.{name}", f"must be a finite number, got {value}")
    caps = limits.gateway
    if len(p.stop) > caps.max_stop_strings:
        raise InvalidField("sampling_params.stop", f"at most {caps.max_stop_strings} stop strings, got {len(p.stop)}")
    if any(len(s) > caps.max_stop_string_chars for s in p.stop):
        raise InvalidField("sampling_params.stop", f"each stop string must be at most {caps.max_stop_string_chars} "
                           "characters")
    if len(p.stop_token_ids) > caps.max_stop_token_ids:
        raise InvalidField("sampling_params.stop_token_ids",
                           f"at most {caps.max_stop_token_ids} stop token ids, got {len(p.stop_token_ids)}")
    bad = next((t for t in p.stop_token_ids if t >= limits.vocab_size), None)
    if bad is not None:
        raise InvalidField("sampling_params.stop_token_ids",
                           f"token id {bad} is outside the vocabulary [0, {limits.vocab_size})")
    bad = next((e.token_id for e in p.logit_bias if e.token_id >= limits.vocab_size), None)
    if bad is not None:
        raise InvalidField("sampling_params.logit_bias",
                           f"token id {bad} is outside the vocabulary [0, {limits.vocab_size})")
    if not all(math.isfinite(e.bias) for e in p.logit_bias):
        raise InvalidField("sampling_params.logit_bias", "biases must be finite numbers")
    constraint = constraint_of(p)  # raises InvalidField("sampling_params.<its field>")
    try:
        params = SamplingParams(
            max_tokens=p.max_tokens if p.HasField("max_tokens") else limits.max_model_len,  # unset: resolved later
            min_tokens=p.min_tokens,
            logit_bias=tuple((e.token_id, e.bias) for e in p.logit_bias),
            prompt_logprobs=p.prompt_logprobs if p.HasField("prompt_logprobs") else None,
            top_k=p.top_k,
            seed=p.seed if p.HasField("seed") else None,
            stop=tuple(p.stop),
            stop_token_ids=tuple(p.stop_token_ids),
            ignore_eos=p.ignore_eos,
            n=p.n if p.HasField("n") else 1,
            beam_width=max(p.beam_width, 1),
            logprobs=p.logprobs or p.top_logprobs > 0,
            top_logprobs=p.top_logprobs,
            early_stopping=EarlyStopping.of(p.early_stopping),  # the public enum has the internal one's numbers
            constraint=constraint,
            **floats,
        )
    except InvalidField as exc:
        raise InvalidField(f"sampling_params.{exc.field}", exc.reason) from None
    return params
