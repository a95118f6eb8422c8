"""The OpenAI-compatible HTTP front end in process, in front of the scripted fake scheduler of
test_server, spoken to with the official ``openai`` client (and raw HTTP for what the client hides):
completions and chat, whole and streamed, n, logprobs, usage, cancellation upstream on disconnect, and
OpenAI-shaped errors with their HTTP codes."""

import asyncio
import contextlib
import math
import shutil

import aiohttp
import pytest
from transformers import AutoTokenizer

import clients  # noqa: F401

# isort: split
from pagedserve.internal.v1 import scheduler_pb2
from scheduler_svc.engine import UNAVAILABLE
from scheduler_svc.gateway.chat import CHAT_TEMPLATE_FILE
from scheduler_svc.gateway.openai_http import OpenAIServer
from scheduler_svc.gateway.tokenizer import Tokenizer
from tests.factories import make_checkpoint
from tests.scheduler_svc.gateway.test_chat import CHATML
from tests.scheduler_svc.gateway.test_server import TEXT, one_token_per_step, running
from tests.scheduler_svc.gateway.test_server import FakeScheduler as BaseFake
from tests.waiting import wait_until_async

openai = pytest.importorskip("openai")  # a dev extra: the GPU image lacks it (tests/gpu/fetch_wheels.sh fetches it)

LENGTH = scheduler_pb2.FINISH_REASON_LENGTH
MAX_MODEL_LEN = 1024


class FakeScheduler(BaseFake):
    """test_server's fake with room for chat-templated prompts."""

    async def GetEngineInfo(self, request, context):
        info = await super().GetEngineInfo(request, context)
        info.max_model_len = MAX_MODEL_LEN
        return info


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The demo checkpoint with a ChatML template."""
    path = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "demo")
    (path / CHAT_TEMPLATE_FILE).write_text(CHATML)
    return path


@pytest.fixture(scope="module")
def plain_dir(model_dir, tmp_path_factory):
    """The same checkpoint without a chat template."""
    path = tmp_path_factory.mktemp("plain") / "demo"
    shutil.copytree(model_dir, path)
    (path / CHAT_TEMPLATE_FILE).unlink()
    return path


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return Tokenizer(model_dir)


@contextlib.asynccontextmanager
async def serving(model_dir, fake):
    """(openai.AsyncOpenAI, base URL, gateway) for a gateway with its HTTP front end on a free port."""
    async with running(model_dir, fake) as (_, gateway, _):
        http = OpenAIServer(gateway.core, gateway.chat)
        port = await http.start("127.0.0.1", 0)
        base = f"http://127.0.0.1:{port}/v1"
        client = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0)
        try:
            yield client, base, gateway
        finally:
            await client.close()
            await http.stop()


def test_models(model_dir):
    async def scenario():
        async with serving(model_dir, FakeScheduler(lambda s: [[7]])) as (client, _, _):
            models = await client.models.list()
            assert [(m.id, m.object, m.owned_by) for m in models.data] == [("demo", "model", "pagedserve")]
            assert models.data[0].max_model_len == MAX_MODEL_LEN  # the fake's EngineInfo
            assert (await client.models.retrieve("demo")).id == "demo"
            with pytest.raises(openai.NotFoundError) as err:
                await client.models.retrieve("gpt-9")
            assert err.value.body["code"] == "model_not_found"

    asyncio.run(scenario())


def test_completions_whole_and_streamed(model_dir, tokenizer):
    fake = FakeScheduler(one_token_per_step(tokenizer))
    prompt_len = len(tokenizer.encode("a prompt"))

    async def scenario():
        async with serving(model_dir, fake) as (client, _, _):
            done = await client.completions.create(model="demo", prompt="a prompt", max_tokens=50, seed=3,
                                                   temperature=0.5, top_p=0.9, stop=["zzz"])
            assert done.object == "text_completion" and done.id.startswith("cmpl-")
            assert [(c.index, c.text, c.finish_reason) for c in done.choices] == [(0, TEXT, "length")]
            n_text = len(tokenizer.encode(TEXT))
            assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (
                prompt_len, n_text, prompt_len + n_text)
            p = fake.submits[-1].sampling_params
            assert (p.max_tokens, p.seed, p.has_seed, round(p.temperature, 3), round(p.top_p, 3)) == (
                50, 3, True, 0.5, 0.9)

            chunks = [c async for c in await client.completions.create(
                model="demo", prompt=[5, 6, 7], max_tokens=50, stream=True, stream_options={"include_usage": True})]
            assert "".join(c.choices[0].text for c in chunks[:-1]) == TEXT
            assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "length"
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n_text
            assert all(c.usage is None for c in chunks[:-1])
            assert list(fake.submits[-1].prompt_token_ids) == [5, 6, 7]
            assert p.max_tokens == 50 and fake.submits[-1].sampling_params.max_tokens == 50

            default = await client.completions.create(model="demo", prompt="x")
            assert fake.submits[-1].sampling_params.max_tokens == 16  # OpenAI's default
            assert default.choices[0].finish_reason == "length"

    asyncio.run(scenario())


def test_several_prompts_and_n(model_dir, tokenizer):
    def out(index, token_ids, reason=0):
        return scheduler_pb2.RequestOutput(index=index, token_ids=token_ids, finish_reason=reason)

    a, b = tokenizer.encode("hello world"), tokenizer.encode("café 日本語")

    def script(submit):
        if submit.sampling_params.n == 2:
            return [[out(0, a[:1]), out(1, b)], [out(0, a[1:], LENGTH), out(1, [], LENGTH)]]
        return [[t] for t in (a if submit.prompt_token_ids[0] == 5 else b)]

    fake = FakeScheduler(script)

    async def scenario():
        async with serving(model_dir, fake) as (client, _, _):
            done = await client.completions.create(model="demo", prompt="p", max_tokens=20, n=2)
            assert [(c.index, c.text) for c in done.choices] == [(0, "hello world"), (1, "café 日本語")]
            assert done.usage.prompt_tokens == 1 and done.usage.completion_tokens == len(a) + len(b)
            both = await client.completions.create(model="demo", prompt=[[5, 9], [6, 9]], max_tokens=20)
            assert [(c.index, c.text) for c in both.choices] == [(0, "hello world"), (1, "café 日本語")]
            assert both.usage.prompt_tokens == 4 and both.usage.completion_tokens == len(a) + len(b)
            chunks = [c async for c in await client.completions.create(
                model="demo", prompt="p", max_tokens=20, n=2, stream=True)]
            texts = {0: "", 1: ""}
            for c in chunks:
                for choice in c.choices:
                    texts[choice.index] += choice.text
            assert texts == {0: "hello world", 1: "café 日本語"}

    asyncio.run(scenario())


def test_chat_whole_and_streamed(model_dir, tokenizer):
    fake = FakeScheduler(one_token_per_step(tokenizer))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": [
                    {"type": "text", "text": "What is"}, {"type": "text", "text": "paging?"}]}]
    as_text = messages[:3] + [{"role": "user", "content": "What is\npaging?"}]
    want_ids = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
        as_text, add_generation_prompt=True)["input_ids"]

    async def scenario():
        async with serving(model_dir, fake) as (client, _, _):
            done = await client.chat.completions.create(model="demo", messages=messages, max_completion_tokens=60)
            assert done.object == "chat.completion" and done.id.startswith("chatcmpl-")
            (choice,) = done.choices
            assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", TEXT, "length")
            assert list(fake.submits[-1].prompt_token_ids) == want_ids
            assert done.usage.prompt_tokens == len(want_ids)

            await client.chat.completions.create(model="demo", messages=messages[1:2])
            submit = fake.submits[-1]  # no max_tokens: up to the context length
            assert submit.sampling_params.max_tokens == MAX_MODEL_LEN - len(submit.prompt_token_ids)

            chunks = [c async for c in await client.chat.completions.create(
                model="demo", messages=messages, max_tokens=60, stream=True, stream_options={"include_usage": True})]
            assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
            assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == TEXT
            assert chunks[-2].choices[0].finish_reason == "length"
            assert chunks[-1].usage.completion_tokens == len(tokenizer.encode(TEXT))
            assert all(c.object == "chat.completion.chunk" for c in chunks)

    asyncio.run(scenario())


def test_logprobs_in_both_shapes(model_dir, tokenizer):
    ids = tokenizer.encode("hello world")

    def script(submit):
        top = [scheduler_pb2.TopLogprobs(token_ids=[t, 9], logprobs=[-0.5, -math.inf]) for t in ids]
        return [[scheduler_pb2.RequestOutput(token_ids=ids, logprobs=[-0.5] * len(ids), top_logprobs=top,
                                             finish_reason=LENGTH)]]

    fake = FakeScheduler(script)
    spell = [tokenizer.decode([t], skip_special_tokens=False) for t in ids]

    async def scenario():
        async with serving(model_dir, fake) as (client, _, _):
            chat = await client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}],
                                                        max_tokens=len(ids), logprobs=True, top_logprobs=2)
            content = chat.choices[0].logprobs.content
            assert [(e.token, e.logprob, bytes(e.bytes).decode()) for e in content] == [(s, -0.5, s) for s in spell]
            assert [[(t.token, t.logprob) for t in e.top_logprobs] for e in content] == [
                [(s, -0.5), (spell_9, -9999.0)] for s in spell]
            assert fake.submits[-1].sampling_params.top_logprobs == 2 and fake.submits[-1].sampling_params.logprobs

            done = await client.completions.create(model="demo", prompt="x", max_tokens=len(ids), logprobs=2)
            lp = done.choices[0].logprobs
            assert lp.tokens == spell and lp.token_logprobs == [-0.5] * len(ids)
            assert lp.top_logprobs == [{s: -0.5, spell_9: -9999.0} for s in spell]  # JSON has no -Infinity
            assert lp.text_offset == [sum(len(s) for s in spell[:i]) for i in range(len(spell))]

    spell_9 = tokenizer.decode([9], skip_special_tokens=False)
    asyncio.run(scenario())


def test_disconnect_mid_stream_aborts_upstream(model_dir):
    fake = FakeScheduler(lambda submit: [[7]] * 10_000)
    fake.step_s = 0.002

    async def scenario():
        async with serving(model_dir, fake) as (_, base, _):
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{base}/chat/completions", json={
                        "model": "demo", "messages": [{"role": "user", "content": "go"}],
                        "stream": True}) as resp:
                    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
                    first = await resp.content.readline()
                    assert first.startswith(b"data: {")
            await wait_until_async(lambda: len(fake.aborts) == 1, 10, what="the Abort upstream")
            assert fake.aborts[0].startswith("chatcmpl-")

    asyncio.run(scenario())


def test_errors_are_openai_shaped(model_dir, plain_dir):
    fake = FakeScheduler(lambda submit: [[7]])

    async def raw(base, method, path, body=None, data=None):
        async with aiohttp.ClientSession() as session, session.request(
                method, f"{base}{path}", json=body, data=data) as resp:
            return resp.status, await resp.json()

    async def scenario():
        async with serving(model_dir, fake) as (client, base, _):
            cases = [
                ({"prompt": "x", "top_p": 2.0}, 400, "top_p"),
                ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
                ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
                ({"prompt": "", "max_tokens": 2}, 400, "prompt"),
                ({"prompt": [5, 100000]}, 400, "prompt"),
                ({"prompt": "x", "logprobs": 21}, 400, "logprobs"),
                ({"prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
                ({"prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias"),
                ({"prompt": "x", "logit_bias": {"five": 1}}, 400, "logit_bias"),
                ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
                ({"prompt": "x", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens"),
                ({"prompt": "x", "prompt_logprobs": 21}, 400, "prompt_logprobs"),
                ({"prompt": "x", "n": 2, "best_of": 3}, 400, "best_of"),
                ({"prompt": "x", "model": "gpt-9"}, 404, "model"),
            ]
            for body, status, param in cases:
                got = await raw(base, "POST", "/completions", body)
                assert got[0] == status, (body, got)
                error = got[1]["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, (body, got)
                assert error["type"] == "invalid_request_error"
            chat_cases = [
                ({"messages": []}, "messages"),
                ({"messages": [{"role": "user"}]}, "messages[0].content"),
                ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
                ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
                ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_completion_tokens"),
            ]
            for body, param in chat_cases:
                status, got = await raw(base, "POST", "/chat/completions", body)
                assert (status, got["error"]["param"]) == (400, param), (body, got)
            assert (await raw(base, "POST", "/completions", data=b"{not json"))[0] == 400
            status, got = await raw(base, "GET", "/nowhere")
            assert status == 404 and got["error"]["code"] == "not_found"
            status, got = await raw(base, "GET", "/completions")
            assert status == 405 and got["error"]["code"] == "method_not_allowed"
            with pytest.raises(openai.BadRequestError) as err:
                await client.completions.create(model="demo", prompt="x", top_p=0)
            assert err.value.status_code == 400 and err.value.body["param"] == "top_p"
        async with serving(plain_dir, fake) as (client, base, _):
            with pytest.raises(openai.BadRequestError) as err:
                await client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}])
            assert err.value.body["code"] == "failed_precondition" and "no chat template" in err.value.message

    asyncio.run(scenario())


def test_status_codes_of_engine_failures(model_dir):
    errors = {
        2: scheduler_pb2.RequestOutput(finish_reason=scheduler_pb2.FINISH_REASON_ERROR,
                                       error="engine failed: a worker disconnected",
                                       status_code=UNAVAILABLE),  # as the engine sends it
        3: scheduler_pb2.RequestOutput(finish_reason=scheduler_pb2.FINISH_REASON_ERROR, error="step failed: boom"),
    }
    fake = FakeScheduler(lambda submit: errors[submit.sampling_params.max_tokens])

    async def scenario():
        async with serving(model_dir, fake) as (client, base, gateway):
            async with aiohttp.ClientSession() as session, session.get(base.removesuffix("/v1") + "/health") as resp:
                assert resp.status == 200
            with pytest.raises(openai.InternalServerError) as err:
                await client.completions.create(model="demo", prompt="x", max_tokens=2)
            assert err.value.status_code == 503 and err.value.body["code"] == "unavailable"
            with pytest.raises(openai.InternalServerError) as err:
                await client.completions.create(model="demo", prompt="x", max_tokens=3)
            assert err.value.status_code == 500 and err.value.body["type"] == "server_error"
            fake.ready = False
            fake.break_streams()  # the gateway loses the scheduler: UNAVAILABLE until it is back
            await wait_until_async(lambda: not gateway.engines.connected, 10, what="the gateway to see the loss")
            with pytest.raises(openai.InternalServerError) as err:
                await client.completions.create(model="demo", prompt="x", max_tokens=2)
            assert err.value.status_code == 503 and err.value.body["code"] == "unavailable"
            async with aiohttp.ClientSession() as session, session.get(base.removesuffix("/v1") + "/health") as resp:
                assert resp.status == 503

    asyncio.run(scenario())
