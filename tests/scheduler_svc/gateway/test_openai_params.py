"""Every parameter of issue 23's front door, table-driven, against the HTTP front end in front of the
scripted fake scheduler: each honoured one shows its effect (in the text, or in what reached the
scheduler), each refused one gets a 400 naming it, metadata is accepted; plus the parameter table's
consistency with docs/OPENAI.md and the context-error wording that litellm and LangChain match."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass

import pytest

aiohttp = pytest.importorskip("aiohttp")
pytest.importorskip("openai")

# isort: split
from scheduler_svc.gateway import openai_params  # noqa: E402
from scheduler_svc.gateway.context_window import prompt_too_long, request_too_long  # noqa: E402
from tests.protos.proto_helpers import REPO  # noqa: E402
from tests.scheduler_svc.gateway.test_openai_http import (  # noqa: E402
    MAX_MODEL_LEN,
    FakeScheduler,
    serving,
)
from tests.scheduler_svc.gateway.test_openai_http import model_dir as model_dir  # noqa: E402 (fixture)
from tests.scheduler_svc.gateway.test_openai_http import tokenizer as tokenizer  # noqa: E402 (fixture)
from tests.scheduler_svc.gateway.test_server import TEXT, one_token_per_step  # noqa: E402

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40}
COMPLETION = {"model": "demo", "prompt": "hello there", "max_tokens": 40}


@dataclass
class Seen:
    """What one request produced: HTTP status, body (or SSE events) and the Submit the scheduler got."""

    status: int
    body: dict | list
    submit: object = None

    @property
    def text(self) -> str:
        choice = self.body["choices"][0]
        return choice["message"]["content"] if "message" in choice else choice["text"]

    @property
    def params(self):
        return self.submit.sampling_params


@dataclass
class Case:
    name: str
    endpoint: str  # "chat" or "completions"
    extra: dict
    check: Callable[[Seen], None]
    drop: tuple[str, ...] = ()  # keys of the base body to leave out


def ok(check):
    def run(seen: Seen) -> None:
        assert seen.status == 200, seen.body
        check(seen)
    return run


def refused(param: str):
    def run(seen: Seen) -> None:
        assert seen.status == 400, seen.body
        assert seen.body["error"]["param"] == param and seen.body["error"]["message"].startswith(f"{param}: ")
        assert seen.submit is None  # nothing reached the scheduler
    return run


def prompt_ids(seen: Seen) -> list[int]:
    return list(seen.submit.prompt_token_ids)


CASES = [
    # stop: a string or a list, on both endpoints; the stop string is cut unless include_stop_str_in_output
    Case("stop string, chat", "chat", {"stop": "paged"}, ok(lambda s: s.text == "hello world, ")),
    Case("stop list, completions", "completions", {"stop": ["café", "paged"]},
         ok(lambda s: s.text == "hello world, ")),
    Case("include_stop_str_in_output, chat", "chat", {"stop": ["paged"], "include_stop_str_in_output": True},
         ok(lambda s: s.text == "hello world, paged")),
    Case("include_stop_str_in_output, completions", "completions",
         {"stop": "paged", "include_stop_str_in_output": True},
         ok(lambda s: s.text == "hello world, paged")),
    Case("ignore_eos", "chat", {"ignore_eos": True}, ok(lambda s: s.params.ignore_eos)),
    Case("truncate_prompt_tokens", "completions", {"truncate_prompt_tokens": 2},
         ok(lambda s: len(s.submit.prompt_token_ids) == 2)),
    Case("truncate_prompt_tokens -1 (the whole prompt)", "completions", {"truncate_prompt_tokens": -1},
         ok(lambda s: len(s.submit.prompt_token_ids) > 2)),
    Case("truncate_prompt_tokens 0", "completions", {"truncate_prompt_tokens": 0}, refused("truncate_prompt_tokens")),
    Case("use_beam_search", "completions", {"use_beam_search": True, "n": 3, "length_penalty": 0.5},
         ok(lambda s: (s.params.beam_width, s.params.n, s.params.length_penalty) == (3, 1, 0.5))),
    Case("use_beam_search with one beam is greedy", "chat", {"use_beam_search": True},
         ok(lambda s: s.params.temperature == 0 and s.params.beam_width <= 1)),
    Case("length_penalty without beam search", "chat", {"length_penalty": 0.5}, refused("length_penalty")),
    Case("no max_tokens on chat: until the context ends", "chat", {},
         ok(lambda s: s.params.max_tokens == MAX_MODEL_LEN - len(s.submit.prompt_token_ids)), drop=("max_tokens",)),
    Case("no max_tokens on completions: OpenAI's 16", "completions", {}, ok(lambda s: s.params.max_tokens == 16),
         drop=("max_tokens",)),
    Case("metadata fields are accepted", "chat", {"user": "u1", "metadata": {"k": "v"}, "store": False,
                                                   "service_tier": "auto"}, ok(lambda s: s.text)),
    Case("neutral value of a refused field", "chat", {"allowed_token_ids": [], "bad_words": [], "modalities": ["text"]},
         ok(lambda s: s.text)),
    Case("unknown field", "chat", {"max_tokenz": 3}, refused("max_tokenz")),
    Case("completion-only field on chat", "chat", {"suffix": "x"}, refused("suffix")),
    Case("guided_whitespace_pattern", "chat", {"guided_whitespace_pattern": " "}, refused("guided_whitespace_pattern")),
    Case("stream_options without stream", "chat", {"stream_options": {"include_usage": True}},
         refused("stream_options")),
    Case("structured_outputs whitespace_pattern", "chat",
         {"structured_outputs": {"json_object": True, "whitespace_pattern": " *"}},
         refused("structured_outputs.whitespace_pattern")),
    Case("tools on completions", "completions", {"tools": [{"type": "function", "function": {"name": "f"}}]},
         refused("tools")),
    Case("skip_special_tokens false", "completions", {"skip_special_tokens": False}, refused("skip_special_tokens")),
    Case("stream_options unknown key", "chat", {"stream": True, "stream_options": {"foo": True}},
         refused("stream_options.foo")),
    Case("continue_final_message with add_generation_prompt", "chat",
         {"continue_final_message": True, "add_generation_prompt": True}, refused("continue_final_message")),
    Case("over the context", "chat", {"max_tokens": MAX_MODEL_LEN}, lambda s: (
        s.status == 400 and s.body["error"]["code"] == "context_length_exceeded"
        and "This model's maximum context length is 1024 tokens" in s.body["error"]["message"]) or pytest.fail(
        str(s.body))),
]


async def _send(session, base: str, fake, case: Case) -> Seen:
    body = dict(CHAT if case.endpoint == "chat" else COMPLETION)
    for key in case.drop:
        body.pop(key)
    body.update(case.extra)
    path = "chat/completions" if case.endpoint == "chat" else "completions"
    before = len(fake.submits)
    async with session.post(f"{base}/{path}", json=body) as resp:
        raw = await resp.text()
    payload = ([json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
               if body.get("stream") and resp.status == 200 else json.loads(raw))
    return Seen(resp.status, payload, fake.submits[before] if len(fake.submits) > before else None)


def test_every_parameter_has_its_effect_or_its_400(model_dir, tokenizer):
    fake = FakeScheduler(one_token_per_step(tokenizer))

    async def scenario():
        async with serving(model_dir, fake) as (_, base, _):
            async with aiohttp.ClientSession() as session:
                for case in CASES:
                    seen = await _send(session, base, fake, case)
                    try:
                        case.check(seen)
                    except AssertionError as exc:
                        raise AssertionError(f"{case.name}: {exc}") from None

    asyncio.run(scenario())


def test_chat_template_options_and_echo(model_dir, tokenizer):
    """add_generation_prompt, continue_final_message and vLLM's chat echo, against the template itself."""
    fake = FakeScheduler(one_token_per_step(tokenizer))
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is"}]

    async def scenario():
        async with serving(model_dir, fake) as (_, base, gateway):
            template = gateway.chat.template
            async with aiohttp.ClientSession() as session:
                async def ids_of(**extra) -> tuple[list[int], dict]:
                    case = Case("", "chat", {"messages": conversation, **extra}, lambda s: None)
                    seen = await _send(session, base, fake, case)
                    assert seen.status == 200, seen.body
                    return list(seen.submit.prompt_token_ids), seen.body

                with_prompt, _ = await ids_of()
                assert with_prompt == tokenizer.encode(template.render(conversation, True), add_special_tokens=False)
                without, _ = await ids_of(add_generation_prompt=False)
                assert without == tokenizer.encode(template.render(conversation, False), add_special_tokens=False)
                assert len(without) < len(with_prompt)
                continued, body = await ids_of(continue_final_message=True)
                assert tokenizer.decode(continued, skip_special_tokens=False).endswith("The answer is")
                assert body["choices"][0]["message"]["content"] == TEXT[:len(body["choices"][0]["message"]["content"])]
                _, echoed = await ids_of(continue_final_message=True, echo=True)
                content = echoed["choices"][0]["message"]["content"]
                assert content.startswith("The answer is") and content[len("The answer is"):] in TEXT

    asyncio.run(scenario())


def test_continuous_usage_stats_in_every_chunk(model_dir, tokenizer):
    fake = FakeScheduler(one_token_per_step(tokenizer))

    async def scenario():
        async with serving(model_dir, fake) as (_, base, _):
            async with aiohttp.ClientSession() as session:
                case = Case("", "completions", {"stream": True, "stream_options": {
                    "include_usage": True, "continuous_usage_stats": True}}, lambda s: None)
                seen = await _send(session, base, fake, case)
                assert seen.status == 200
                usages = [e["usage"] for e in seen.body]
                prompt = len(seen.submit.prompt_token_ids)
                assert all(u["prompt_tokens"] == prompt for u in usages)
                counts = [u["completion_tokens"] for u in usages]
                assert counts == sorted(counts) and counts[0] >= 1 and counts[-1] == len(tokenizer.encode(TEXT))
                assert all(u["total_tokens"] == prompt + u["completion_tokens"] for u in usages)

    asyncio.run(scenario())


def test_context_error_is_what_litellm_and_langchain_match():
    """litellm's ExceptionCheckers.is_error_str_context_window_exceeded looks for "this model's maximum
    context length is" in the lowercased error; LangChain's _handle_openai_bad_request for
    "context_length_exceeded" (our error code) in the error's text; vLLM's own words otherwise."""
    assert request_too_long(37, 8155, 8192) == (
        "This model's maximum context length is 8192 tokens. However, you requested 8192 tokens (37 in the "
        "messages, 8155 in the completion). Please reduce the length of the messages or completion.")
    assert prompt_too_long(9000, 8192) == (
        "This model's maximum context length is 8192 tokens. However, you requested 9000 tokens in the messages, "
        "Please reduce the length of the messages.")
    for message in (request_too_long(37, 8155, 8192), prompt_too_long(9000, 8192)):
        assert "this model's maximum context length is" in message.lower()


def test_the_parameter_table_is_documented():
    doc = (REPO / "docs" / "OPENAI.md").read_text(encoding="utf-8")
    for name, endpoints, status, _ in openai_params.table():
        assert f"| `{name}` | {endpoints} | {status} |" in doc, name


def test_probe_routes_in_vllm_shapes(model_dir, tokenizer):
    """/ping, /version, /tokenize (prompt and messages), /detokenize and /metrics on the API port."""
    fake = FakeScheduler(one_token_per_step(tokenizer))

    async def scenario():
        async with serving(model_dir, fake) as (_, base, gateway):
            root = base.removesuffix("/v1")
            async with aiohttp.ClientSession() as session:
                for method in (session.get, session.post):
                    async with method(f"{root}/ping") as resp:
                        assert resp.status == 200
                async with session.get(f"{root}/version") as resp:
                    assert resp.status == 200 and (await resp.json())["version"]
                async with session.post(f"{root}/tokenize", json={"prompt": TEXT, "return_token_strs": True}) as resp:
                    got = await resp.json()
                ids = tokenizer.encode(TEXT)
                assert got == {"count": len(ids), "max_model_len": MAX_MODEL_LEN, "tokens": ids,
                               "token_strs": [tokenizer.id_to_token(t) for t in ids]}
                messages = [{"role": "user", "content": "hi"}]
                async with session.post(f"{root}/tokenize", json={"messages": messages}) as resp:
                    got = await resp.json()
                rendered = gateway.chat.template.render(messages, True)
                assert got["tokens"] == tokenizer.encode(rendered, add_special_tokens=False)
                async with session.post(f"{root}/detokenize", json={"tokens": ids}) as resp:
                    assert await resp.json() == {"prompt": tokenizer.decode(ids)}
                async with session.post(f"{root}/detokenize", json={"tokens": [10**6]}) as resp:
                    assert resp.status == 400 and (await resp.json())["error"]["param"] == "tokens"
                async with session.post(f"{root}/tokenize", json={"text": "x"}) as resp:
                    assert resp.status == 400 and (await resp.json())["error"]["param"] == "text"
                async with session.get(f"{root}/metrics") as resp:
                    assert resp.status == 200 and "pagedserve_gateway" in await resp.text()

    asyncio.run(scenario())
