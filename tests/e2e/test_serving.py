"""`pagedserve serve` end to end on CPU: real processes on loopback, the Python and Go clients.

One service is shared by most tests (module scope); the SIGTERM and killed-worker tests start their own.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

import clients  # noqa: F401

# isort: split
from pagedserve.client import AsyncClient, Client, GenerationError, SamplingParams
from scheduler_svc.bench.local_service import LocalService
from scheduler_svc.gateway.tokenizer import Tokenizer
from tests.e2e.tp_helpers import kill_mid_stream
from tests.factories import make_checkpoint
from tests.protos.proto_helpers import REPO, go_env, require_go
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

CONTEXT_LEN = 4096  # long enough that a 4000-token generation outlives a 1-second deadline
MAX_TOKENS = 24
PROMPTS = [
    "Hello, paged world", "The quick brown fox", "café 日本語 and more", "memory block table",
    "A request in the batch", "Zürich São Paulo", "kernel tensor layer", "😀 🚀 🎉",
    "decode prefill step", "The river and the mountain", "free list queue", "hello world",
]
STOP_PROMPTS = range(8, 12)  # these get a stop string taken from their greedy text
START_TIMEOUT_S = 180


class Service(LocalService):
    """A `pagedserve serve` launcher process and what it printed (one gateway and a 32 MiB pool unless
    ``extra`` says otherwise), ready to serve."""

    def __init__(self, model: Path, log_dir: Path, *extra: str) -> None:
        super().__init__(model, "--kv-cache-memory", "32MiB", "--gateways", "1", *extra, log_dir=log_dir,
                         start_timeout_s=START_TIMEOUT_S)
        with Client(self.target) as client:
            client.wait_ready(START_TIMEOUT_S)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", max_position_embeddings=CONTEXT_LEN)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return Tokenizer(checkpoint)


@pytest.fixture(scope="module")
def service(checkpoint, tmp_path_factory):
    svc = Service(checkpoint, tmp_path_factory.mktemp("logs"))
    yield svc
    assert svc.stop() == 0, "\n".join(svc.lines)


@pytest.fixture(scope="module")
def hf_greedy(checkpoint, tokenizer):
    """transformers' greedy ids per prompt: fp32, one prompt at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    outs = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer.encode(prompt)])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                                 do_sample=False, pad_token_id=model.config.eos_token_id)
            outs.append(gen[0, ids.shape[1]:].tolist())
    return outs


def stop_string_for(text: str) -> str | None:
    """Two ASCII letters from the middle of ``text``."""
    return next((text[p : p + 2] for p in range(4, len(text) - 1) if text[p : p + 2].isascii()
                 and text[p : p + 2].isalpha()), None)


def test_sixteen_concurrent_streams(service, tokenizer, hf_greedy):
    """12 greedy streams equal transformers (4 of them cut by a stop string), 4 cancelled mid-stream;
    afterwards every block is free and the service keeps serving."""
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    stops = {i: stop_string_for(tokenizer.decode(hf_greedy[i])) for i in STOP_PROMPTS}
    assert all(stops.values()), stops

    async def complete(client, i):
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, stop=[stops[i]] if i in stops else [])
        return await client.complete(PROMPTS[i], params, request_id=f"p{i}", timeout=120)

    async def cancel_midway(client, i):
        stream = client.generate(PROMPTS[i], SamplingParams(max_tokens=3000, ignore_eos=True, seed=i),
                                 request_id=f"c{i}", timeout=120)
        received = 0
        async for chunk in stream:
            received += len(chunk.token_ids)
            if received >= 2:
                stream.cancel()
        return received

    async def run():
        async with AsyncClient(service.target) as client:
            return await asyncio.gather(*[complete(client, i) for i in range(len(PROMPTS))],
                                        *[cancel_midway(client, i) for i in range(4)])

    results = asyncio.run(run())
    eos = set(service.engine_info().eos_token_ids)
    for i, want in enumerate(hf_greedy):
        (out,) = results[i]
        full_text = tokenizer.decode(want)
        if i in stops:
            assert out.text == full_text[: full_text.find(stops[i])], i
            assert out.finish_reason == "stop" and out.token_ids == want[: len(out.token_ids)]
            assert stops[i] in tokenizer.decode(out.token_ids)
        else:
            assert out.token_ids == want, f"prompt {i}: {PROMPTS[i]!r}"
            assert out.text == full_text
            assert out.finish_reason == ("stop" if want[-1] in eos else "length")
        assert out.usage.completion_tokens == len(out.token_ids)
        assert out.usage.prompt_tokens == len(tokenizer.encode(PROMPTS[i]))
    assert all(2 <= n < 3000 for n in results[len(PROMPTS):])
    service.wait_all_blocks_free()
    with Client(service.target) as client:
        (again,) = client.complete(PROMPTS[0], greedy)
    assert again.token_ids == hf_greedy[0]


def test_parallel_samples_and_beam_search(service, tokenizer):
    with Client(service.target) as client:
        samples = client.complete("Hello", SamplingParams(max_tokens=8, n=3, seed=5, ignore_eos=True), timeout=120)
        beams = client.complete("Hello", SamplingParams(max_tokens=8, beam_width=2), timeout=120)
    assert [s.index for s in samples] == [0, 1, 2] and [b.index for b in beams] == [0, 1]
    assert all(len(s.token_ids) == 8 and s.finish_reason == "length" for s in samples)
    for c in samples + beams:
        assert c.text == tokenizer.decode(c.token_ids) and c.usage.completion_tokens == len(c.token_ids)
    service.wait_all_blocks_free()


def test_deadline_on_a_long_generation(service):
    with Client(service.target) as client:
        start = time.monotonic()
        with pytest.raises(GenerationError) as err:
            client.complete("Hello", SamplingParams(max_tokens=4000, ignore_eos=True), timeout=1.0)
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - start < 10
    service.wait_all_blocks_free()


@pytest.mark.parametrize("prompt, params, model, field", [
    ("", {}, "", "text"),
    ("hello " * (CONTEXT_LEN + 10), {}, "", "text"),  # longer than the context
    ("hi", {"max_tokens": 0}, "", "sampling_params.max_tokens"),
    ("hi", {"top_p": 1.5}, "", "sampling_params.top_p"),
    ("hi", {"temperature": -1.0}, "", "sampling_params.temperature"),
    ("hi", {"n": 0}, "", "sampling_params.n"),
    ("hi", {}, "no-such-model", "model"),
])
def test_bad_requests_are_invalid_argument(service, prompt, params, model, field):
    with Client(service.target) as client:
        with pytest.raises(GenerationError) as err:
            client.complete(prompt, SamplingParams(**{"max_tokens": 4, **params}), model=model, timeout=30)
        assert (err.value.code, err.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, field)
        assert field in err.value.message
        (ok,) = client.complete("hi", SamplingParams(max_tokens=3, ignore_eos=True), timeout=60)
        assert len(ok.token_ids) == 3
    service.wait_all_blocks_free()


def test_go_client_gets_the_same_text(service, tmp_path):
    require_go()
    binary = tmp_path / "pagedserve-generate"
    build = subprocess.run(["go", "build", "-o", str(binary), "pagedserve/cmd/pagedserve-generate"], cwd=REPO,
                           env=go_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    prompt = "Hello, paged world"
    with Client(service.target) as client:
        (want,) = client.complete(prompt, SamplingParams(max_tokens=16, temperature=0.0), timeout=60)
    proc = subprocess.run([str(binary), "-target", service.target, "-prompt", prompt, "-max-tokens", "16",
                           "-temperature", "0"], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode() == want.text + "\n"


def test_generate_cli(service, tokenizer, hf_greedy):
    base = [sys.executable, "-m", "scheduler_svc.cli", "generate", "--target", service.target, "--prompt", PROMPTS[0],
            "--max-tokens", str(MAX_TOKENS), "--temperature", "0"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([*base, "--json"], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["token_ids"] == hf_greedy[0] and out["text"] == tokenizer.decode(hf_greedy[0])
    assert out["finish_reason"] in ("length", "stop")
    plain = subprocess.run(base, capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert plain.stdout == out["text"] + "\n"
    bad = subprocess.run([*base[:-4], "--max-tokens", "0"], capture_output=True, text=True, timeout=120, cwd=REPO,
                         env=env)
    assert bad.returncode == 1 and bad.stderr.startswith("pagedserve generate: INVALID_ARGUMENT: ")


def test_model_info_and_request_summary_log(service, checkpoint):
    with Client(service.target) as client:
        info = client.model_info()
        assert (info.model, info.max_model_len, info.block_size) == (checkpoint.name, CONTEXT_LEN, 16)
        (out,) = client.complete("Hello", SamplingParams(max_tokens=5, ignore_eos=True), request_id="log-me")
    log = service.log_dir / "gateway.log"

    def summaries():
        lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
        return [x for x in lines if x.get("request_id") == "log-me"]

    (summary,) = wait_until(summaries, 10, interval_s=0.05, what="the request summary in gateway.log")
    assert summary["event"] == "request finished" and summary["component"] == "gateway"
    assert (summary["status"], summary["finish_reason"]) == ("OK", "length")
    assert (summary["prompt_tokens"], summary["completion_tokens"]) == (out.usage.prompt_tokens, 5)
    assert 0 < summary["time_to_first_token_s"] <= summary["total_s"]


def _stream_in_thread(target: str, params: SamplingParams, results: dict, key, started: threading.Event):
    def run():
        try:
            with Client(target) as client:
                chunks = []
                for chunk in client.generate("Hello", params, timeout=120):
                    chunks.append(chunk)
                    started.set()
                results[key] = chunks
        except GenerationError as exc:
            results[key] = exc
        results[f"{key}-end"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_sigterm_drains_in_flight_streams(checkpoint, tmp_path):
    svc = Service(checkpoint, tmp_path, "--drain-timeout", "120")
    try:
        results: dict = {}
        firsts = [threading.Event() for _ in range(8)]
        params = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)
        threads = [_stream_in_thread(svc.target, params, results, i, firsts[i]) for i in range(8)]
        assert all(e.wait(60) for e in firsts)
        svc.proc.send_signal(signal.SIGTERM)
        with Client(svc.target) as client:
            wait_until(lambda: not client.is_serving(), 10, interval_s=0.05, what="NOT_SERVING after SIGTERM")
            with pytest.raises(GenerationError) as err:
                client.complete("Hello", SamplingParams(max_tokens=3), timeout=10)
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
        for t in threads:
            t.join(120)
        for i in range(8):
            assert not isinstance(results[i], Exception), results[i]
            assert sum(len(c.token_ids) for c in results[i]) == 120
            assert results[i][-1].finish_reason == "length"
        assert svc.proc.wait(60) == 0
        lines = [json.loads(x) for x in (tmp_path / "gateway.log").read_text().splitlines() if x.startswith("{")]
        (draining,) = [x for x in lines if x["event"] == "draining"]
        assert draining["requests_in_flight"] == 8  # all of them were running when the drain began
    finally:
        svc.stop()


def test_killed_worker_ends_streams_with_unavailable(checkpoint, tmp_path):
    svc = Service(checkpoint, tmp_path)
    try:
        kill_mid_stream(svc, "worker", max_tokens=4000)
    finally:
        svc.stop()
