"""`pagedserve serve --gateways 2` end to end on CPU: two gateway processes share the port.

Which gateway served a request is read from the gateways' own request logs (``--log-dir`` gives each
its file, gateway0.log and gateway1.log, and every request ends with a "request finished" line naming
its request_id): the kernel spreads connections, so the test opens one channel (connection) per
stream. A killed gateway is restarted by design (scheduler_svc/gateway_group.py): its streams end
UNAVAILABLE, the other gateway's streams go on, and new connections are served. SIGTERM drains both.
"""

import asyncio
import json
import os
import signal
import threading
import time

import grpc
import pytest

import clients  # noqa: F401

# isort: split
from pagedserve.client import AsyncClient, Client, GenerationError, SamplingParams
from tests.e2e.test_serving import Service
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

PROMPTS = ["Hello, paged world", "The quick brown fox", "café 日本語 and more", "memory block table",
           "A request in the batch", "Zürich São Paulo", "kernel tensor layer", "😀 🚀 🎉"]
NUM_STREAMS = 16  # one connection each: all on one of two gateways has probability 2**-15
LONG = 200  # tokens of the streams that a killed gateway interrupts (the others run to their end)
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tests.factories import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama")


@pytest.fixture(scope="module")
def service(checkpoint, tmp_path_factory):
    svc = Service(checkpoint, tmp_path_factory.mktemp("logs"), "--gateways", "2", "--drain-timeout", "120")
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def hf_greedy(checkpoint):
    """transformers' greedy ids per prompt (fp32), and the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from scheduler_svc.gateway.tokenizer import Tokenizer

    tokenizer = Tokenizer(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    outs = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer.encode(prompt)])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                 pad_token_id=model.config.eos_token_id)
            outs.append(gen[0, ids.shape[1]:].tolist())
    return outs, tokenizer


def served_by(service, gateway: str) -> dict[str, dict]:
    """request_id -> the 'request finished' line of that gateway's log."""
    path = service.log_dir / f"{gateway}.log"
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.startswith("{")]
    return {x["request_id"]: x for x in lines if x.get("event") == "request finished"}


async def _complete_each_on_its_own_connection(target: str, jobs: list[tuple[str, str, SamplingParams]]):
    async def one(request_id, prompt, params):
        async with AsyncClient(target, options=OWN_CONNECTION) as client:
            return await client.complete(prompt, params, request_id=request_id, timeout=120)

    return await asyncio.gather(*(one(*job) for job in jobs), return_exceptions=True)


def test_streams_spread_over_both_gateways_with_exact_text(service, hf_greedy):
    want, tokenizer = hf_greedy
    assert {"gateway0", "gateway1"} <= set(service.pids)
    greedy = SamplingParams(max_tokens=16, temperature=0.0)
    jobs = [(f"spread-{i}", PROMPTS[i % len(PROMPTS)], greedy) for i in range(NUM_STREAMS)]
    results = asyncio.run(_complete_each_on_its_own_connection(service.target, jobs))
    for i, result in enumerate(results):
        assert not isinstance(result, Exception), result
        (out,) = result
        assert out.token_ids == want[i % len(PROMPTS)], i
        assert out.text == tokenizer.decode(out.token_ids)
    ids = {f"spread-{i}" for i in range(NUM_STREAMS)}
    by_gateway = wait_until(lambda: (lambda a, b: (a, b) if len(a) + len(b) == NUM_STREAMS else None)(
        ids & set(served_by(service, "gateway0")), ids & set(served_by(service, "gateway1"))),
        10, interval_s=0.05, what="every request's summary line in a gateway log")
    assert all(by_gateway), f"all {NUM_STREAMS} streams on one gateway: {by_gateway}"
    assert not (by_gateway[0] & by_gateway[1])
    service.wait_all_blocks_free()


def _long_stream(target: str, request_id: str, results: dict, started: threading.Event) -> threading.Thread:
    def run():
        try:
            with Client(target, options=OWN_CONNECTION) as client:
                n = 0
                for chunk in client.generate("Hello", SamplingParams(max_tokens=LONG, ignore_eos=True),
                                             request_id=request_id, timeout=240):
                    n += len(chunk.token_ids)
                    started.set()
                results[request_id] = n
        except GenerationError as exc:
            results[request_id] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_killed_gateway_is_restarted_while_the_other_keeps_serving(service):
    results: dict = {}
    started = [threading.Event() for _ in range(NUM_STREAMS)]
    threads = [_long_stream(service.target, f"kill-{i}", results, started[i]) for i in range(NUM_STREAMS)]
    assert all(e.wait(60) for e in started)
    victim = service.pids["gateway1"]
    os.kill(victim, signal.SIGKILL)
    restarted = service.wait_for(r"the gateway1 process exited with code -9; restarted it \(pid (\d+)\)", 30)
    assert int(restarted) != victim and service.proc.poll() is None
    for t in threads:
        t.join(150)
    summary = {rid: r.code.name if isinstance(r, GenerationError) else r for rid, r in results.items()}
    lost = {rid for rid, r in results.items() if isinstance(r, GenerationError)}
    assert all(results[rid].code == grpc.StatusCode.UNAVAILABLE for rid in lost), [
        (rid, results[rid].message) for rid in lost if results[rid].code != grpc.StatusCode.UNAVAILABLE]
    survived = {rid for rid, r in results.items() if not isinstance(r, GenerationError)}
    assert lost and survived, f"all {NUM_STREAMS} streams were on one gateway: {summary}"
    assert all(results[rid] == LONG for rid in survived), summary  # gateway0's streams ran to their end
    assert survived <= set(served_by(service, "gateway0"))  # ...logged by gateway0, which served them
    service.wait_all_blocks_free()  # the scheduler aborted the dead gateway's requests

    # New connections are served, by both gateways again once the new gateway1 is up.
    def both_serve_again():
        jobs = [(f"after-{time.monotonic_ns()}-{i}", PROMPTS[0], SamplingParams(max_tokens=4, ignore_eos=True))
                for i in range(NUM_STREAMS)]
        outs = asyncio.run(_complete_each_on_its_own_connection(service.target, jobs))
        assert not [o for o in outs if isinstance(o, Exception)], outs
        return {rid for rid, *_ in jobs} & set(served_by(service, "gateway1"))

    wait_until(both_serve_again, 60, interval_s=0.5, what="the restarted gateway1 to serve requests")


def test_sigterm_drains_both_gateways(service):
    results: dict = {}
    started = [threading.Event() for _ in range(NUM_STREAMS)]
    params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)

    def stream(i: int) -> None:
        try:
            with Client(service.target, options=OWN_CONNECTION) as client:
                chunks = []
                for chunk in client.generate("Hello", params, request_id=f"drain-{i}", timeout=240):
                    chunks.append(chunk)
                    started[i].set()
                results[i] = chunks
        except GenerationError as exc:
            results[i] = exc

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(NUM_STREAMS)]
    for t in threads:
        t.start()
    assert all(e.wait(60) for e in started)
    service.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(150)
    for i in range(NUM_STREAMS):
        assert not isinstance(results[i], Exception), results[i]
        assert sum(len(c.token_ids) for c in results[i]) == 100 and results[i][-1].finish_reason == "length"
    assert service.proc.wait(60) == 0
    draining = {}
    for gateway in ("gateway0", "gateway1"):
        lines = [json.loads(x) for x in (service.log_dir / f"{gateway}.log").read_text().splitlines()
                 if x.startswith("{")]
        draining[gateway] = [x["requests_in_flight"] for x in lines if x["event"] == "draining"]
    # each drained once, and together they held every stream when the drain began
    assert [len(v) for v in draining.values()] == [1, 1]
    assert sum(v[0] for v in draining.values()) == NUM_STREAMS
    assert all(v[0] > 0 for v in draining.values()), draining
