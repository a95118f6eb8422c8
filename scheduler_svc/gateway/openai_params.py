"""Every request field of /v1/completions and /v1/chat/completions, and what we do with it.

Honour or refuse, never ignore: each field OpenAI's API or vLLM's server defines is in ``FIELDS`` as
honoured (the handlers read it), ignored by design (metadata that changes no output: ``user``,
``metadata``, ``store``, ...), or refused with a 400 naming it when it is set to anything but its
neutral value (``presence_penalty: 0`` is fine, ``0.5`` is refused). A field in neither API is refused
as unknown, so a misspelt parameter is never silently dropped. docs/OPENAI.md is this table in prose.
"""

from __future__ import annotations

from dataclasses import dataclass

import clients  # noqa: F401
from pagedserve.v1 import generation_pb2
from scheduler_svc.gateway.openai_protocol import ApiError, bool_param, float_param, int_param

HONOURED, IGNORED, REFUSED = "honoured", "ignored", "refused"
_ANY = object()  # a refused field with no neutral value: refused whenever it is set (not null)


@dataclass(frozen=True, slots=True)
class Field:
    status: str
    endpoints: str = "both"  # "both", "chat" or "completions"
    neutral: tuple = ()  # values of a refused field that ask for nothing (accepted)
    note: str = ""


def _refused(note: str, *neutral, endpoints: str = "both") -> Field:
    return Field(REFUSED, endpoints, tuple(neutral), note)


def _ignored(note: str, endpoints: str = "both") -> Field:
    return Field(IGNORED, endpoints, (), note)


def _honoured(endpoints: str = "both") -> Field:
    return Field(HONOURED, endpoints)


FIELDS: dict[str, Field] = {
    # ---- both endpoints, honoured
    **{name: _honoured() for name in (
        "model", "max_tokens", "n", "stop", "stream", "stream_options", "temperature", "top_p", "seed",
        "logprobs", "top_k", "min_p", "repetition_penalty", "ignore_eos", "stop_token_ids",
        "include_stop_str_in_output", "truncate_prompt_tokens", "use_beam_search", "length_penalty",
        "early_stopping", "min_tokens", "presence_penalty", "frequency_penalty", "logit_bias")},
    "echo": Field(HONOURED, "both", (), "chat: the last assistant message opens the reply; completions: the "
                  "prompt opens the text (with logprobs: its tokens' logprobs, the first null)"),
    "prompt_logprobs": Field(HONOURED, "completions", (), "chat: refused by name (completions only)"),
    "prompt": _honoured("completions"),
    "best_of": Field(HONOURED, "completions", (), "must equal n: every sample (or beam) drawn is returned"),
    "messages": _honoured("chat"),
    "max_completion_tokens": _honoured("chat"),
    "top_logprobs": _honoured("chat"),
    "add_generation_prompt": _honoured("chat"),
    "continue_final_message": _honoured("chat"),
    # ---- metadata: accepted, changes nothing
    "user": _ignored("an end-user id for the caller's own records"),
    "metadata": _ignored("key-value tags for the caller's own records", "chat"),
    "store": _ignored("OpenAI's stored completions; nothing is stored here", "chat"),
    "service_tier": _ignored("OpenAI's billing tier; every request is served alike"),
    "prompt_cache_key": _ignored("OpenAI's cache routing hint; the prefix cache needs none"),
    "safety_identifier": _ignored("an end-user id for OpenAI's abuse monitoring"),
    "response_format": Field(HONOURED, "both", (), "text, json_object, json_schema (strict): an output constraint"),
    "structured_outputs": Field(HONOURED, "both", (), "vLLM's json, json_object, regex, choice, grammar"),
    **{f"guided_{k}": Field(HONOURED, "both", (), "vLLM's older name of structured_outputs") for k in (
        "json", "regex", "choice", "grammar")},
    "tools": Field(HONOURED, "chat", (), "streamed calls: the header, then argument fragments as generated"),
    "tool_choice": _honoured("chat"),
    "parallel_tool_calls": Field(HONOURED, "chat", (), "false: at most one call (tool_choice required: one item)"),
    "tool_call_parser": Field(HONOURED, "chat", (), "pagedserve's: the per-request --tool-call-parser"),
    # ---- refused unless neutral (see docs/OPENAI.md)
    "allowed_token_ids": _refused("not implemented", []),
    "bad_words": _refused("not implemented", []),
    "logits_processors": _refused("not implemented", []),
    "guided_decoding_backend": _refused("xgrammar is the only backend", "xgrammar"),
    "guided_whitespace_pattern": _refused("not implemented (JSON allows at most 8 whitespace characters in a row)"),
    "structural_tag": _refused("not implemented"),
    "functions": _refused("function calling is not implemented", [], endpoints="chat"),
    "function_call": _refused("function calling is not implemented", "none", endpoints="chat"),
    "suffix": _refused("insertion (suffix) is not implemented", "", endpoints="completions"),
    "add_special_tokens": _refused("prompts get the tokenizer's special tokens (completions: true) or the "
                                   "template's (chat: false), vLLM's defaults", _ANY),
    "skip_special_tokens": _refused("special tokens are always left out of the text", True),
    "spaces_between_special_tokens": _refused("the tokenizer's own decoding is used", True),
    "return_tokens_as_token_ids": _refused("not implemented", False),
    "return_token_ids": _refused("not implemented", False),
    "prompt_embeds": _refused("prompts are text or token ids"),
    "chat_template": _refused("the model's own chat template is used", endpoints="chat"),
    "chat_template_kwargs": _refused("the model's own chat template is used", {}, endpoints="chat"),
    "documents": _refused("the model's own chat template is used", [], endpoints="chat"),
    "mm_processor_kwargs": _refused("text-only models", {}),
    "modalities": _refused("text output only", ["text"], endpoints="chat"),
    "audio": _refused("text output only", endpoints="chat"),
    "prediction": _refused("predicted outputs are not implemented", endpoints="chat"),
    "reasoning_effort": _refused("not a reasoning model", endpoints="chat"),
    "include_reasoning": _refused("not a reasoning model", False, endpoints="chat"),
    "verbosity": _refused("not implemented", endpoints="chat"),
    "web_search_options": _refused("web search is not available", endpoints="chat"),
    "priority": _refused("requests are served first come, first served", 0),
    "request_id": _refused("the server names requests itself"),
    "cache_salt": _refused("the prefix cache is shared by all requests"),
    "kv_transfer_params": _refused("disaggregated prefill is not implemented"),
    "vllm_xargs": _refused("no extension arguments are taken"),
}


def check_fields(body: dict, endpoint: str) -> None:
    """400 naming the first field that is unknown here or refused with a non-neutral value."""
    for name, value in body.items():
        spec = FIELDS.get(name)
        if spec is None or spec.endpoints not in ("both", endpoint):
            raise ApiError.invalid(name, f"is not a parameter of /v1/{_path(endpoint)} on this server "
                                   "(see docs/OPENAI.md)")
        neutral = spec.neutral if name != "add_special_tokens" else (endpoint == "completions",)
        if spec.status == REFUSED and value is not None and not _neutral(value, neutral):
            raise ApiError.invalid(name, f"is not supported: {spec.note}")


def _neutral(value, neutral: tuple) -> bool:
    """``value`` equals one of ``neutral`` (True is not 1 and False is not 0 here)."""
    return any(value == n and isinstance(value, bool) == isinstance(n, bool) for n in neutral)


def _path(endpoint: str) -> str:
    return "chat/completions" if endpoint == "chat" else "completions"


def table() -> list[tuple[str, str, str, str]]:
    """(field, endpoints, status, note) rows, for the docs and their test."""
    return [(name, f.endpoints, f.status, f.note) for name, f in sorted(FIELDS.items())]


# ---- the honoured vLLM extensions, onto the public proto


def vllm_sampling(body: dict, p: generation_pb2.SamplingParams) -> None:
    """Sets what vLLM's extensions ask for on ``p`` (after openai_protocol.sampling_params)."""
    if bool_param(body, "include_stop_str_in_output"):
        p.include_stop_str_in_output = True
    if (k := int_param(body, "truncate_prompt_tokens", -1)) is not None and k != -1:  # -1: the whole context
        if k == 0:
            raise ApiError.invalid("truncate_prompt_tokens", "must be -1 or at least 1, got 0")
        p.truncate_prompt_tokens = k
    if bool_param(body, "use_beam_search"):
        _beam_search(body, p)
    else:
        for name in ("length_penalty", "early_stopping"):
            if body.get(name) not in (None, False) and not (name == "length_penalty" and body[name] == 1):
                raise ApiError.invalid(name, "applies to beam search only (use_beam_search: true)")


_EARLY_STOPPING = {False: generation_pb2.EARLY_STOPPING_HEURISTIC, True: generation_pb2.EARLY_STOPPING_ON_FULL,
                   "never": generation_pb2.EARLY_STOPPING_NEVER}


def _beam_search(body: dict, p: generation_pb2.SamplingParams) -> None:
    """vLLM's use_beam_search: n (or best_of) beams, all returned, scored as transformers' beam search.
    One beam is greedy search."""
    width = max(p.n if p.HasField("n") else 1, int_param(body, "best_of", 1) or 1)
    p.ClearField("n")
    if width == 1:
        p.temperature = 0.0
    else:
        p.beam_width = width
    if (penalty := float_param(body, "length_penalty")) is not None:
        p.length_penalty = penalty
    stopping = body.get("early_stopping", False)
    if not any(stopping == k and isinstance(stopping, bool) == isinstance(k, bool) for k in _EARLY_STOPPING):
        raise ApiError.invalid("early_stopping", f"must be true, false or \"never\", got {stopping!r}")
    p.early_stopping = next(v for k, v in _EARLY_STOPPING.items()
                            if stopping == k and isinstance(stopping, bool) == isinstance(k, bool))


def chat_render_options(body: dict) -> dict:
    """add_generation_prompt (default true) and continue_final_message (default false), as vLLM takes
    them: both set true is refused."""
    add = body.get("add_generation_prompt")
    cont = bool_param(body, "continue_final_message")
    if add is not None and not isinstance(add, bool):
        raise ApiError.invalid("add_generation_prompt", f"must be true or false, got {add!r}")
    if cont and add:
        raise ApiError.invalid("continue_final_message", "cannot be true together with add_generation_prompt")
    return {"add_generation_prompt": not cont if add is None else add, "continue_final_message": cont}


def chat_echo(body: dict, messages: list[dict]) -> str:
    """vLLM's chat echo: the last message's content, when its role is the assistant's, opens the reply."""
    if not bool_param(body, "echo") or not messages:
        return ""
    last = messages[-1]
    return last.get("content") or "" if last.get("role") == "assistant" else ""


if __name__ == "__main__":  # the table of docs/OPENAI.md
    print("| parameter | endpoints | status | note |\n|---|---|---|---|")
    for row in table():
        print(f"| `{row[0]}` | {row[1]} | {row[2]} | {row[3]} |")
