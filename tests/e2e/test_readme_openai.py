"""The README's OpenAI examples, verbatim, against the service as `make run` starts it (out/smollm2, the
Makefile's serve flags, the default KV pool; only the ports are free ones): the curl example answers 200
with the README's text, the `openai` snippet streams a reply, and the everyday SDK calls that send no
max_tokens (plain, n=2, streamed with continuous usage) succeed. Skips without out/smollm2."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest

from scheduler_svc.bench.local_service import LocalService
from tests.protos.proto_helpers import REPO

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

README = (REPO / "README.md").read_text(encoding="utf-8")
START_TIMEOUT_S = 300


def makefile_serve_flags() -> list[str]:
    """The flags of the Makefile's `run` target's serve command, --model and the ports left out (the test
    passes its own)."""
    recipe = re.search(r"^run:.*\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.M).group(1)
    line = next(cmd for cmd in recipe.splitlines() if "scheduler_svc.cli serve" in cmd)
    args = shlex.split(line.split("scheduler_svc.cli serve", 1)[1])
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in ("--model", "--http-port", "--port", "--host"):
            skip = True
        else:
            out.append(a)
    return out


def readme_block(lang: str, must_hold: str) -> str:
    """The README's first ``lang`` code block that holds ``must_hold``."""
    for block in re.findall(rf"```{lang}\n(.*?)```", README, re.S):
        if must_hold in block:
            return block
    raise AssertionError(f"README has no {lang} block with {must_hold!r}")


@pytest.fixture(scope="module")
def service(tmp_path_factory, smollm2_dir):
    svc = LocalService(smollm2_dir, *makefile_serve_flags(), "--http-port", "0",
                       log_dir=tmp_path_factory.mktemp("logs"), start_timeout_s=START_TIMEOUT_S)
    svc.http_port = int(svc.wait_for(r"OpenAI-compatible HTTP API on http://127\.0\.0\.1:(\d+)/v1"))
    yield svc
    assert svc.stop() == 0, "\n".join(svc.lines)


@pytest.fixture(scope="module")
def client(service):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{service.http_port}/v1", api_key="unused", max_retries=0,
                       timeout=300) as c:
        yield c


def test_served_context_fits_the_default_pool(service, client):
    """A pool shorter than the model's context lowers the served context, says so once, and reports it."""
    (card,) = client.models.list().data
    served = card.max_model_len
    said = [line for line in service.lines if "serving max_model_len" in line]
    if said:
        assert len(said) == 1 and f"serving max_model_len {served}" in said[0]
    assert served > 1000


def test_readme_curl_example(service):
    block = readme_block("sh", "curl -s localhost:8000/v1/chat/completions")
    command, shown = re.split(r"^\$ curl", block, maxsplit=1, flags=re.M)[1].split("\n{", 1)
    command = "curl" + command.replace("localhost:8000", f"127.0.0.1:{service.http_port}")
    out = subprocess.run(["bash", "-c", command + " -w '\\n%{http_code}'"], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    body, status = out.rsplit("\n", 1)
    assert status == "200", body
    got = json.loads(body)
    # The README elides ids and counters with "..."; every value it spells out must be what came back.
    shown_line = shown.split("\n")[0]
    content = re.search(r'"content": "([^"]*)"', shown_line).group(1)
    (choice,) = got["choices"]
    assert choice["message"] == {"role": "assistant", "content": content}
    assert choice["finish_reason"] == re.search(r'"finish_reason": "(\w+)"', shown_line).group(1)
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert got["usage"][key] == int(re.search(rf'"{key}": (\d+)', shown_line).group(1))
    assert got["object"] == "chat.completion" and got["model"] == "smollm2"


def test_readme_openai_snippet(service, tmp_path):
    block = readme_block("python", "from openai import OpenAI")
    script = block.replace("http://localhost:8000/v1", f"http://127.0.0.1:{service.http_port}/v1")
    (tmp_path / "snippet.py").write_text(script)
    run = subprocess.run([sys.executable, str(tmp_path / "snippet.py")], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()  # a streamed greeting


HELLO = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_without_max_tokens_runs_to_its_end(client):
    out = client.chat.completions.create(model="smollm2", messages=HELLO, temperature=0)
    assert out.choices[0].finish_reason == "stop" and "Paris" in out.choices[0].message.content


def test_n_2_without_max_tokens(client):
    out = client.chat.completions.create(model="smollm2", messages=HELLO, n=2, temperature=0, seed=1)
    assert [c.index for c in out.choices] == [0, 1]
    assert all(c.finish_reason == "stop" and "Paris" in c.message.content for c in out.choices)


def test_streamed_with_continuous_usage(client):
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=HELLO, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert all(c.usage is not None for c in chunks)  # usage in every chunk
    completion = [c.usage.completion_tokens for c in chunks]
    assert completion == sorted(completion) and chunks[-1].choices == []
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text and chunks[-1].usage.completion_tokens == completion[-2] > 0
    assert chunks[-1].usage.prompt_tokens == chunks[0].usage.prompt_tokens > 0


def test_over_long_request_gets_vllm_context_error(client, service):
    (card,) = client.models.list().data
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=card.max_model_len)
    message = err.value.body["message"]
    assert re.search(rf"This model's maximum context length is {card.max_model_len} tokens\. However, you "
                     r"requested \d+ tokens \(\d+ in the messages, \d+ in the completion\)\. Please reduce the "
                     r"length of the messages or completion\.", message)
    assert err.value.body["code"] == "context_length_exceeded" and "block" not in message
