"""`pagedserve serve` under hostile input and failure, end to end on CPU: huge prompts refused at once
while other streams go on, top logprobs equal to transformers' through the gateway, the CLI and the
offline API, a hung (SIGSTOPped) worker caught by the step watchdog, a second SIGTERM and a killed
gateway reported honestly, TLS and token authentication, reflection v1 and Health/List."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import clients  # noqa: F401

# isort: split
from pagedserve.client import AsyncClient, Client, GenerationError, SamplingParams
from scheduler_svc.bench.local_service import REPO, LocalService
from scheduler_svc.gateway.tokenizer import Tokenizer
from tests.certs import make_ca, make_cert
from tests.factories import make_checkpoint
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

CONTEXT_LEN = 512
ENGINE = ("--kv-cache-memory", "32MiB")
TOP = 5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", max_position_embeddings=CONTEXT_LEN)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return Tokenizer(checkpoint)


KEEPALIVE_S = 1.0


@pytest.fixture(scope="module")
def service(checkpoint, tmp_path_factory):
    # The gateway pings its scheduler stream every second (10 by default): see the idle-link test.
    svc = LocalService(checkpoint, *ENGINE, "--scheduler-keepalive", f"{KEEPALIVE_S:g}",
                       log_dir=tmp_path_factory.mktemp("logs"))
    yield svc
    assert svc.stop() == 0, "\n".join(svc.lines)


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def check_against_transformers(hf_model, prompt: list[int], tokens: list[int], logprobs: list[float],
                               tops: list[list[tuple[int, float]]], k: int) -> None:
    """Each token's logprob and its k alternatives equal transformers' log-softmax top-k (fp32)."""
    with torch.inference_mode():
        logits = hf_model(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1 :].float()
    ref = torch.log_softmax(logits, dim=-1)
    assert len(tops) == len(tokens) == len(logprobs)
    for i, (token, lp, top) in enumerate(zip(tokens, logprobs, tops, strict=True)):
        assert lp == pytest.approx(ref[i, token].item(), abs=1e-4), i
        kth = ref[i].topk(k).values[-1].item()
        assert len(top) == k and [v for _, v in top] == sorted((v for _, v in top), reverse=True)
        for token_id, value in top:  # each alternative is one of transformers' top k, with its value
            assert value == pytest.approx(ref[i, token_id].item(), abs=1e-4), (i, token_id)
            assert value >= kth - 1e-4
        assert len({t for t, _ in top}) == k


# Sends a 10 MB and a 64 MB GenerateRequest (built before the clock starts) and prints, as JSON, each
# one's status, details and refusal time, with the wall-clock window they spanned.
HUGE_SENDER = """
import json, sys, time
import grpc
import clients
from pagedserve.v1 import generation_pb2
four = generation_pb2.SamplingParams(max_tokens=4)
payloads = {mb: generation_pb2.GenerateRequest(text="x" * (mb * 2**20), sampling_params=four).SerializeToString()
            for mb in (10, 64)}
out = {"start": time.time()}
with grpc.insecure_channel(sys.argv[1], options=[("grpc.max_send_message_length", -1)]) as channel:
    grpc.channel_ready_future(channel).result(timeout=30)
    call = channel.unary_stream("/pagedserve.v1.GenerationService/Generate")
    for mb, data in payloads.items():
        t0 = time.perf_counter()
        try:
            list(call(data, timeout=60))
            out[mb] = ["OK", "", time.perf_counter() - t0]
        except grpc.RpcError as err:
            out[mb] = [err.code().name, err.details(), time.perf_counter() - t0]
out["end"] = time.time()
print(json.dumps(out))
"""


def test_huge_prompts_are_refused_at_once_while_streams_go_on(service):
    """10 MB and 64 MB prompts (the request limit is 4 MiB), sent by another process while 16 streams
    run: each refusal comes back quickly, and the streams keep their pace meanwhile."""
    stop = asyncio.Event()

    async def stream(client, i, arrivals):
        s = client.generate(f"stream {i}", SamplingParams(max_tokens=None, ignore_eos=True), timeout=300)
        async for chunk in s:
            arrivals.append((time.time(), len(chunk.token_ids)))
            if stop.is_set():
                s.cancel()

    async def run():
        arrivals = [[] for _ in range(16)]
        async with AsyncClient(service.target) as client:
            tasks = [asyncio.create_task(stream(client, i, arrivals[i])) for i in range(16)]
            while min(map(len, arrivals)) < 2:  # every stream under way
                await asyncio.sleep(0.01)
            sender = await asyncio.create_subprocess_exec(
                sys.executable, "-c", HUGE_SENDER, service.target, cwd=REPO, stdout=asyncio.subprocess.PIPE,
                env=dict(os.environ, PYTHONPATH=str(REPO)))
            out, _ = await sender.communicate()
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*tasks)
        return arrivals, json.loads(out)

    arrivals, sent = asyncio.run(run())
    t0, t1 = sent["start"], sent["end"]
    print({mb: f"{sent[mb][0]} in {1e3 * sent[mb][2]:.0f} ms" for mb in ("10", "64")})
    for mb in ("10", "64"):
        code, details, seconds = sent[mb]
        assert code == "RESOURCE_EXHAUSTED" and "larger than max" in details, details
        assert seconds < 2.0, f"{mb} MB refused after {seconds:.2f} s"  # 0.1-0.5 s here; loose for a loaded CI
    # The streams kept their pace while the huge requests came in, and went on after them.
    def gaps(lo, hi):
        return [b[0] - a[0] for a_list in arrivals for a, b in zip(a_list, a_list[1:], strict=False)
                if lo <= b[0] and a[0] <= hi]

    during, before = gaps(t0, t1), gaps(0, t0)
    print(f"inter-token gaps of the 16 streams: largest {1e3 * max(during):.0f} ms while the huge requests were "
          f"refused, {1e3 * max(before):.0f} ms before")
    assert during and max(during) < 1.0, max(during)
    assert all(a[-1][0] > t1 for a in arrivals)  # every stream was still producing after the window
    service.wait_all_blocks_free()


def test_top_logprobs_through_the_gateway_equal_transformers(service, tokenizer, hf_model):
    for params in (SamplingParams(max_tokens=6, temperature=0.0, top_logprobs=TOP, ignore_eos=True),
                   SamplingParams(max_tokens=6, temperature=0.9, seed=3, top_logprobs=TOP, ignore_eos=True)):
        with Client(service.target) as client:
            (done,) = client.complete("The river and the mountain", params, timeout=120)
        check_against_transformers(hf_model, tokenizer.encode("The river and the mountain"), done.token_ids,
                                   [lp.logprob for lp in done.logprobs], [list(lp.top) for lp in done.logprobs], TOP)
        assert [lp.token_id for lp in done.logprobs] == done.token_ids


def test_generate_cli_prints_logprobs(service, tokenizer, hf_model):
    def generate(*extra: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "scheduler_svc.cli", "generate", "--target", service.target,
                               "--prompt", "Hello, paged world", "--max-tokens", "5", "--temperature", "0",
                               "--ignore-eos", "--logprobs", "3", *extra],
                              capture_output=True, text=True, timeout=120, cwd=REPO,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    out = json.loads(generate("--json"))
    check_against_transformers(hf_model, tokenizer.encode("Hello, paged world"), out["token_ids"],
                               [lp["logprob"] for lp in out["logprobs"]],
                               [[tuple(t) for t in lp["top"]] for lp in out["logprobs"]], 3)
    for lp in out["logprobs"]:  # each token's text beside its id, the alternatives' too
        assert lp["text"] == tokenizer.decode([lp["token_id"]])
        assert lp["top_texts"] == [tokenizer.decode([t]) for t, _ in lp["top"]]
    # The plain format: the streamed text, then a line per token with its id and its quoted text.
    lines = generate().splitlines()[-5:]
    for line, lp in zip(lines, out["logprobs"], strict=True):
        head = f"token {lp['token_id']} {json.dumps(lp['text'], ensure_ascii=False)}: {lp['logprob']:.4f}  top: "
        t, _ = lp["top"][0]
        assert line.startswith(head + f"{t} {json.dumps(lp['top_texts'][0], ensure_ascii=False)}:"), line


def test_offline_llm_returns_top_logprobs(checkpoint, tokenizer, hf_model):
    from gpu_worker.sampling_params import SamplingParams as OfflineParams
    from scheduler_svc.llm import LLM

    with LLM(checkpoint, kv_cache_memory="16MiB") as llm:
        (result,) = llm.generate("memory block table", OfflineParams(max_tokens=6, temperature=0.0,
                                                                     top_logprobs=TOP, ignore_eos=True))
    (out,) = result.outputs
    check_against_transformers(hf_model, result.prompt_token_ids, out.token_ids, out.logprobs, out.top_logprobs, TOP)


@pytest.mark.parametrize("length_penalty", [1000.0, 3e38, -2000.0])
def test_an_extreme_length_penalty_returns_its_beams_and_the_engine_lives(service, length_penalty):
    """The hostile probe's request (issue 22): beam search with a length penalty whose power overflows a
    float (or underflows to 0) used to raise in the beam scorer and take the engine down."""
    from pagedserve.v1 import generation_pb2, generation_pb2_grpc

    params = generation_pb2.SamplingParams(max_tokens=6, beam_width=2, length_penalty=length_penalty)
    request = generation_pb2.GenerateRequest(text="The capital of France is", sampling_params=params)
    with grpc.insecure_channel(service.target) as channel:
        replies = list(generation_pb2_grpc.GenerationServiceStub(channel).Generate(request, timeout=60))
    finals = [r for r in replies if r.finish_reason]
    assert sorted(r.index for r in finals) == [0, 1]
    with Client(service.target) as client:  # the engine still serves
        (done,) = client.complete("Hello", SamplingParams(max_tokens=3, temperature=0))
    assert len(done.token_ids) == 3
    service.wait_all_blocks_free()
    assert service.proc.poll() is None


def test_a_vanishing_temperature_generates_the_greedy_text(service):
    """Temperatures at the float minimum used to make nan probabilities (every token id 0, status OK)."""
    with Client(service.target) as client:
        (greedy,) = client.complete("The capital of France is", SamplingParams(max_tokens=8, temperature=0))
        for temperature in (1e-38, 1e-45):
            (tiny,) = client.complete("The capital of France is",
                                      SamplingParams(max_tokens=8, temperature=temperature, seed=1))
            assert tiny.token_ids == greedy.token_ids, temperature
    assert set(greedy.token_ids) != {0}


def test_an_idle_service_keeps_its_scheduler_stream_quietly(service):
    """Issue 22: the scheduler refused the gateway's keepalive pings (its permitted interval was set
    under a misspelt option name, so grpcio's 5 minutes held): GOAWAY too_many_pings dropped the idle
    stream every minute or so, with gRPC errors on the terminal. Several keepalive periods idle: no
    ping refused, no stream lost, and the service answers at once."""
    service.wait_all_blocks_free()
    time.sleep(8 * KEEPALIVE_S)
    with Client(service.target) as client:
        (done,) = client.complete("Hello", SamplingParams(max_tokens=2, temperature=0), timeout=30)
    assert len(done.token_ids) == 2
    logs = service.logs(tail_chars=10**9) + "\n".join(service.lines)  # since the service started
    for sign in ("stream lost", "too_many_pings", "Too many pings", "GOAWAY"):
        assert sign not in logs, logs


def test_ctrl_c_during_generate_is_one_line(service):
    import threading

    def attempt() -> tuple[int, str] | None:
        proc = subprocess.Popen([sys.executable, "-m", "scheduler_svc.cli", "generate", "--target", service.target,
                                 "--prompt", "Hello", "--max-tokens", str(CONTEXT_LEN - 8), "--ignore-eos"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                env=dict(os.environ, PYTHONPATH=str(REPO)))
        # SIGINT once the command prints streamed text: then it is inside its streaming loop. (The engine's
        # running count is no such state: on a busy machine a request of an earlier test may still hold it
        # while this process is still importing, and SIGINT there is a traceback.)
        out: list[str] = []
        threading.Thread(target=lambda: out.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True).start()
        wait_until(lambda: out, 120, interval_s=0.05, what="the command to print streamed text")
        if proc.poll() is not None:  # it streamed all 504 tokens before this (descheduled) test looked again
            proc.wait(60)
            return None
        proc.send_signal(signal.SIGINT)
        err = proc.stderr.read()
        proc.wait(60)
        return proc.returncode, err

    # Up to three tries: a try where the whole completion streamed before the signal could be sent tests
    # nothing (seen once beside two CPU hogs); one that signals must end in the one line.
    for _ in range(3):
        result = attempt()
        if result is not None:
            break
    assert result is not None, "the completion always ended before SIGINT could be sent"
    assert result == (130, "pagedserve generate: interrupted\n")
    service.wait_all_blocks_free()  # the gateway aborted the request upstream


def test_reflection_v1_and_health_list(service):
    from tests.scheduler_svc.gateway.test_gateway_hardening import _ask_reflection

    (listed,) = _ask_reflection(service.target, "v1", [{"list_services": ""}])
    assert "pagedserve.v1.GenerationService" in {s.name for s in listed.list_services_response.service}
    with grpc.insecure_channel(service.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(), timeout=10)
    assert reply.statuses[""].status == health_pb2.HealthCheckResponse.SERVING


def _streams_in_background(target: str, n: int, **client_kw):
    """n long streams in a thread each; returns (results, first-token events); a result is the list
    of chunks or the GenerationError, with the time it ended under key (i, 'end')."""
    import threading

    results: dict = {}
    firsts = [threading.Event() for _ in range(n)]

    def run(i):
        try:
            with Client(target, **client_kw) as client:
                chunks = []
                for chunk in client.generate(f"stream {i}", SamplingParams(max_tokens=None, ignore_eos=True),
                                             timeout=300):
                    chunks.append(chunk)
                    if sum(len(c.token_ids) for c in chunks) >= 12:  # past the watchdog's warm-up steps
                        firsts[i].set()
                results[i] = chunks
        except GenerationError as exc:
            results[i] = exc
        results[(i, "end")] = time.monotonic()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return results, firsts, threads


def test_a_stopped_worker_fails_the_engine_within_the_step_timeout(checkpoint, tmp_path):
    svc = LocalService(checkpoint, *ENGINE, "--step-timeout", "3", log_dir=tmp_path)
    try:
        results, firsts, threads = _streams_in_background(svc.target, 4)
        assert all(e.wait(120) for e in firsts)
        os.kill(svc.pids["worker"], signal.SIGSTOP)
        stopped = time.monotonic()
        for t in threads:
            t.join(60)
        for i in range(4):
            assert isinstance(results[i], GenerationError), results[i]
            assert results[i].code == grpc.StatusCode.UNAVAILABLE
            assert "no answer from the workers within 3 s" in results[i].message
            assert results[(i, "end")] - stopped < 3 + 2
        assert svc.proc.wait(60) != 0  # the launcher exits non-zero
        assert any("the scheduler process exited with code 1" in line for line in svc.lines), svc.lines
    finally:
        try:
            os.kill(svc.pids["worker"], signal.SIGCONT)
        except ProcessLookupError:
            pass
        svc.stop()


def test_a_second_sigterm_ends_streams_as_aborted_without_blaming_a_worker(checkpoint, tmp_path):
    svc = LocalService(checkpoint, *ENGINE, "--drain-timeout", "300", log_dir=tmp_path)
    try:
        results, firsts, threads = _streams_in_background(svc.target, 4)
        assert all(e.wait(120) for e in firsts)
        svc.proc.send_signal(signal.SIGTERM)
        svc.wait_for(r"(draining)")
        svc.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        for i in range(4):
            assert not isinstance(results[i], Exception), results[i]
            assert results[i][-1].finish_reason == "abort"
        assert svc.proc.wait(60) == 1
        scheduler_log = (tmp_path / "scheduler.log").read_text()
        assert "engine failed" not in scheduler_log and "WorkerFailure" not in scheduler_log, scheduler_log
    finally:
        svc.stop()


def test_a_killed_gateway_is_named_and_no_worker_failure_is_logged(checkpoint, tmp_path):
    """A gateway is restarted by design (scheduler_svc/gateway_group.py): the launcher names it, nothing
    blames a worker, and the restarted gateway serves."""
    svc = LocalService(checkpoint, *ENGINE, log_dir=tmp_path)
    try:
        os.kill(svc.pids["gateway"], signal.SIGKILL)
        svc.wait_for(r"(the gateway process exited with code -9; restarted it)", 60)
        with Client(svc.target) as client:
            client.wait_ready(timeout=60)
            chunks = list(client.generate("Hello", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)))
        assert sum(len(c.token_ids) for c in chunks) == 4 and chunks[-1].finish_reason == "length"
        assert svc.proc.poll() is None
        scheduler_log = (tmp_path / "scheduler.log").read_text()
        assert "engine failed" not in scheduler_log and "WorkerFailure" not in scheduler_log, scheduler_log
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def secure_service(checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secure")
    ca = make_ca(tmp / "ca")
    cert = make_cert(tmp / "server", ca, "server")
    client = make_cert(tmp / "client", ca, "client", server=False)
    token = tmp / "token"
    token.write_text("e2e-token\n")
    svc = LocalService(checkpoint, *ENGINE, "--tls-cert", str(cert.cert), "--tls-key", str(cert.key),
                       "--tls-client-ca", str(ca.cert), "--auth-token-file", str(token), log_dir=tmp / "logs")
    yield svc, {"ca_cert": ca.cert, "client_cert": client.cert, "client_key": client.key}
    assert svc.stop() == 0, "\n".join(svc.lines)


@pytest.mark.parametrize("token, certificate, want", [
    ("e2e-token", True, "OK"),
    (None, True, "UNAUTHENTICATED"),
    ("wrong", True, "UNAUTHENTICATED"),
    ("e2e-token", False, "UNAVAILABLE"),  # mutual TLS: no client certificate, no connection
])
def test_tls_and_token_end_to_end(secure_service, token, certificate, want):
    svc, tls = secure_service
    kw = dict(tls) if certificate else {"ca_cert": tls["ca_cert"]}
    target = svc.target.replace("127.0.0.1", "localhost")  # the certificate's name
    with Client(target, token=token, **kw) as client:
        try:
            (done,) = client.complete("Hello", SamplingParams(max_tokens=3, ignore_eos=True), timeout=60)
            got = "OK" if len(done.token_ids) == 3 else f"{done}"
        except GenerationError as exc:
            got = exc.code.name
    assert got == want
