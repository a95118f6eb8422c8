"""Conversations into prompts: the model's chat template, rendered in the gateway as transformers renders it.

A checkpoint brings its template as ``chat_template.jinja`` (which wins, as in transformers), as
``chat_template`` in ``tokenizer_config.json`` (a string, or named templates of which "default" is
used), or, for a GGUF file, as its ``tokenizer.chat_template`` metadata. The template is compiled
once, at start, in the environment that transformers' ``apply_chat_template`` uses (a sandbox with
trim_blocks and lstrip_blocks, loop controls, its ``tojson``, ``raise_exception`` and
``strftime_now``), and rendered with the same variables (``messages``, ``add_generation_prompt``,
``tools`` and ``documents`` unset, and the named special tokens). The rendered text spells its special
tokens out, so it is tokenized without adding any (as transformers does). We use jinja2 directly
rather than transformers: importing transformers' template module costs the gateway about 0.7 s, and
the tests compare both renderings.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import grpc
import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

import clients  # noqa: F401
from gpu_worker.model_files import resolve_model
from gpu_worker.sampling_params import InvalidField
from pagedserve.v1 import generation_pb2
from scheduler_svc.gateway.generation import GenerationCore, GenerationFailed
from scheduler_svc.gateway.tools import validated_messages
from scheduler_svc.gateway.validation import check_text, token_prompt, validate_messages

CHAT_TEMPLATE_FILE = "chat_template.jinja"
# The special tokens transformers passes to a template by name (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# GGUF metadata keys of the special tokens' ids, as transformers reads them.
_GGUF_TOKEN_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja's own tojson escapes HTML characters; templates expect plain JSON
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_template(source: str) -> jinja2.Template:
    """``source`` compiled in transformers' chat template environment. The {% generation %} tag that
    transformers adds (to mark assistant tokens for training) renders its body and nothing else here."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class _GenerationTag(jinja2.ext.Extension):
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class ChatTemplate:
    """A model's chat template, compiled, with the special tokens it may name."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None) -> None:
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._template = compile_template(source)

    @classmethod
    def from_model(cls, model: str | Path, id_to_token: Callable[[int], str | None]) -> ChatTemplate | None:
        """The template of the checkpoint at ``model`` (a directory or a .gguf file); None when it has
        none. ``id_to_token`` spells the special tokens a GGUF file names by id."""
        path = Path(model)
        config = _json(path / "tokenizer_config.json") if path.is_dir() else {}
        source = None
        if path.is_dir() and (path / CHAT_TEMPLATE_FILE).is_file():
            source = (path / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        elif config.get("chat_template") is not None:
            source = _default_template(config["chat_template"])
        special = _special_tokens(path, config)
        gguf_file = _gguf_file(path) if source is None or not special else None
        if gguf_file is not None:
            reader = _gguf_reader(gguf_file)
            if source is None:
                source = _gguf_value(reader, "tokenizer.chat_template")
            if not special:
                special = _gguf_special_tokens(reader, id_to_token)
        return cls(source, special) if source else None

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True,
               continue_final_message: bool = False, tools: list | None = None) -> str:
        """The prompt text of a conversation; InvalidField("messages") when the template refuses it
        (many raise an exception for roles out of order) or fails on it. ``continue_final_message``
        ends the text inside the last message, so the model continues it (as transformers does)."""
        try:
            text = self._template.render(messages=list(messages), tools=tools, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.exceptions.TemplateError as exc:
            raise InvalidField("messages", f"the model's chat template refused the conversation: {exc}") from None
        except Exception as exc:  # a template that fails on this input (a type error, a missing key)
            raise InvalidField("messages", f"the model's chat template failed on the conversation: {exc!r}") from None
        return _cut_after_final(text, messages[-1]["content"]) if continue_final_message else text


def _cut_after_final(text: str, final: str) -> str:
    """``text`` cut right after the last message's content, as transformers' continue_final_message."""
    at = text.rfind(final.strip())
    if not final.strip() or at < 0:
        raise InvalidField("continue_final_message", "the final message does not appear in the rendered "
                           "conversation (the chat template drops or rewrites it)")
    if text[at: at + len(final.lstrip())] == final.lstrip():  # the template kept the message's spacing
        return text[: at + len(final.lstrip())]
    return text[: at + len(final.strip())]


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    value = json.loads(path.read_text(encoding="utf-8"))
    return value if isinstance(value, dict) else {}


def _default_template(value) -> str | None:
    """tokenizer_config.json's chat_template: one template, or a list of named ones ("default" is used)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default")
    return None


def _token_content(value) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or a serialized AddedToken."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens(path: Path, config: dict) -> dict[str, str]:
    """Named special tokens from tokenizer_config.json, then the legacy special_tokens_map.json."""
    legacy = _json(path / "special_tokens_map.json") if path.is_dir() else {}
    tokens = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = _token_content(config.get(name)) or _token_content(legacy.get(name))
        if value is not None:
            tokens[name] = value
    return tokens


def _gguf_file(path: Path) -> Path | None:
    try:
        return resolve_model(path).gguf_file
    except (OSError, ValueError):
        return None


def _gguf_reader(path: Path):
    from gguf import GGUFReader  # numpy only; memory-mapped, the tensors are not read

    return GGUFReader(path)


def _gguf_value(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _gguf_special_tokens(reader, id_to_token: Callable[[int], str | None]) -> dict[str, str]:
    tokens = {}
    for name, key in _GGUF_TOKEN_IDS.items():
        token_id = _gguf_value(reader, key)
        if token_id is not None and (token := id_to_token(int(token_id))) is not None:
            tokens[name] = token
    return tokens


class ChatPrompts:
    """Conversations to GenerateRequests for GenerationCore (gRPC Chat and the HTTP front end alike)."""

    def __init__(self, core: GenerationCore, template: ChatTemplate | None) -> None:
        self.core = core
        self.template = template

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True,
               continue_final_message: bool = False, tools: list | None = None) -> str:
        """The conversation as the model's template renders it; GenerationFailed when the model has no
        template (FAILED_PRECONDITION) or the conversation is invalid (INVALID_ARGUMENT, ``messages``)."""
        if self.template is None:
            raise GenerationFailed(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"model {self.core.model_name!r} has no chat template (no chat_template.jinja, "
                                   "no chat_template in tokenizer_config.json): send a prompt to Generate instead")
        try:
            return self.template.render(validated_messages(messages, validate_messages), add_generation_prompt,
                                        continue_final_message, tools)
        except InvalidField as exc:
            raise GenerationFailed.invalid(exc.field, exc.reason) from None

    def _checked(self, check, value, limits=None):
        try:
            return check(value, limits or self.core.limits, "messages")
        except InvalidField as exc:
            raise GenerationFailed.invalid(exc.field, exc.reason) from None

    async def request(self, request_id: str, model: str, messages: Sequence[dict],
                      sampling_params: generation_pb2.SamplingParams, **render) -> generation_pb2.GenerateRequest:
        """The GenerateRequest of a conversation (its prompt as token ids); a long one is tokenized in
        the gateway's bounded tokenizer pool, off the event loop. ``render``: add_generation_prompt,
        continue_final_message, tools (OpenAI's function definitions, passed to the template)."""
        limits = self.core.limits
        if sampling_params.HasField("truncate_prompt_tokens"):  # may be longer than the context: cut later
            limits = replace(limits, max_model_len=2**31, max_token_bytes=None)
        text = self._checked(check_text, self.render(messages, **render), limits)
        ids = self._checked(token_prompt, await self.core.encode(text, add_special_tokens=False), limits)
        request = generation_pb2.GenerateRequest(request_id=request_id, model=model, sampling_params=sampling_params)
        request.token_ids.ids.extend(ids)
        return request

    async def from_proto(self, request: generation_pb2.ChatRequest) -> generation_pb2.GenerateRequest:
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        params = request.sampling_params if request.HasField("sampling_params") else None
        generate = await self.request(request.request_id, request.model, messages,
                                      params or generation_pb2.SamplingParams())
        if params is None:
            generate.ClearField("sampling_params")  # every default: until the context ends
        return generate
