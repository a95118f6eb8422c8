"""The engine-level sampling parameters end to end on CPU, over HTTP (/v1/completions) and gRPC, each
checked against transformers on the same fp32 checkpoint: min_tokens, logit_bias, presence_penalty and
frequency_penalty (a reference implementation of OpenAI's formula on transformers' logits), and prompt
logprobs (echo + logprobs + max_tokens 0, vLLM's prompt_logprobs, gRPC's prompt_logprobs) equal to the
log-softmax of transformers' teacher-forced logits, with and without a prefix-cache hit, across
chunked prefill."""

import json

import pytest
import requests
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import clients  # noqa: F401

# isort: split
from pagedserve.client import Client, SamplingParams
from tests.e2e.test_chat_serving import http_base
from tests.e2e.test_serving import Service
from tests.factories import make_checkpoint, random_prompts

pytestmark = pytest.mark.slow

CHUNK = 24  # --max-num-batched-tokens: longer prompts prefill in chunks
TOL = 1e-4
N = 12  # tokens generated per table case


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", max_position_embeddings=512)


@pytest.fixture(scope="module")
def service(checkpoint, tmp_path_factory):
    svc = Service(checkpoint, tmp_path_factory.mktemp("logs"), "--http-port", "0", "--max-num-batched-tokens",
                  str(CHUNK), "--block-size", "8")
    svc.http_base = http_base(svc)
    yield svc
    assert svc.stop() == 0, "\n".join(svc.lines)


@pytest.fixture(scope="module")
def hf(checkpoint):
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(checkpoint):
    return AutoTokenizer.from_pretrained(checkpoint)


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: log-softmax of the teacher-forced logits (row i predicts token i + 1)."""
    with torch.inference_mode():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def reference(hf, prompt: list[int], n: int, presence: float = 0.0, frequency: float = 0.0,
              bias: dict[int, float] | None = None, banned_until: tuple[int, set[int]] = (0, set()),
              stop: set[int] = frozenset()) -> list[int]:
    """Greedy decoding on transformers' logits with OpenAI's formula applied by hand,
    logit[j] += bias[j] - count[j] * frequency - (count[j] > 0) * presence (counts over the output), and
    min_tokens as vLLM's: the ``banned`` tokens are -inf while fewer than ``min_tokens`` are out."""
    min_tokens, banned = banned_until
    out: list[int] = []
    while len(out) < n:
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + out])).logits[0, -1].float().clone()
        for t, b in (bias or {}).items():
            logits[t] += b
        if len(out) < min_tokens:
            logits[list(banned)] = -float("inf")
        for t in set(out):
            logits[t] -= out.count(t) * frequency + presence
        out.append(int(logits.argmax()))
        if out[-1] in stop:
            break
    return out


def run(service, tok, transport: str, prompt: list[int], params: dict) -> tuple[list[int], str]:
    """(token ids, finish reason) of a greedy request over ``transport``."""
    params = dict(params, temperature=0.0)
    if transport == "grpc":
        with Client(service.target) as client:
            (c,) = client.complete(prompt, SamplingParams(**params))
        return c.token_ids, c.finish_reason
    body = dict(params, model="llama", prompt=prompt, logprobs=0)
    if "logit_bias" in body:
        body["logit_bias"] = {str(k): v for k, v in body["logit_bias"].items()}
    r = requests.post(f"{service.http_base}/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    # One logprobs entry per generated token (a stop token too), spelled as the server spells it.
    return choice["logprobs"]["tokens"], choice["finish_reason"]


def spelled(tok, ids: list[int], transport: str):
    return ids if transport == "grpc" else [tok.decode([t], skip_special_tokens=False) for t in ids]


@pytest.fixture(scope="module")
def prompt(hf):
    return random_prompts([12], hf.config.vocab_size, seed=33)[0]  # its greedy text repeats a token


@pytest.fixture(scope="module")
def greedy(hf, prompt):
    return reference(hf, prompt, N)


def case_params(kind: str, greedy: list[int], eos: int) -> tuple[dict, dict]:
    """(request parameters, reference arguments) of one table row."""
    if kind == "logit_bias_ban":
        return {"logit_bias": {greedy[0]: -100.0}}, {"bias": {greedy[0]: -100.0}}
    if kind == "logit_bias_force":
        return {"logit_bias": {7: 100.0}}, {"bias": {7: 100.0}}
    if kind == "presence_penalty":
        return {"presence_penalty": 1.5}, {"presence": 1.5}
    if kind == "frequency_penalty":
        return {"frequency_penalty": 1.2}, {"frequency": 1.2}
    if kind == "mixed":
        return ({"presence_penalty": 0.7, "frequency_penalty": -0.4, "logit_bias": {greedy[1]: 2.5}},
                {"presence": 0.7, "frequency": -0.4, "bias": {greedy[1]: 2.5}})
    if kind == "min_tokens_eos":  # EOS forced first by the bias; min_tokens holds it back for 20 tokens
        return ({"logit_bias": {eos: 100.0}, "min_tokens": 20, "max_tokens": 40},
                {"bias": {eos: 100.0}, "banned_until": (20, {eos}), "stop": {eos}, "n": 40})
    if kind == "min_tokens_stop_id":  # the greedy's 3rd token stops it early, unless min_tokens
        stop = greedy[2]
        return ({"stop_token_ids": [stop], "min_tokens": 20, "max_tokens": 24},
                {"banned_until": (20, {stop, eos}), "stop": {stop, eos}, "n": 24})
    raise AssertionError(kind)


_WANT: dict[str, list[int]] = {}
KINDS = ["logit_bias_ban", "logit_bias_force", "presence_penalty", "frequency_penalty", "mixed", "min_tokens_eos",
         "min_tokens_stop_id"]


@pytest.mark.parametrize("transport", ["http", "grpc"])
@pytest.mark.parametrize("kind", KINDS)
def test_parameter_effect_equals_the_reference(service, hf, tok, prompt, greedy, transport, kind):
    params, ref = case_params(kind, greedy, tok.eos_token_id)
    n = ref.pop("n", N)
    if kind not in _WANT:  # the same reference for both transports
        _WANT[kind] = reference(hf, prompt, n, **ref)
    want = _WANT[kind]
    params.setdefault("max_tokens", N)
    if kind.startswith("min_tokens"):
        params.setdefault("ignore_eos", False)
    else:
        params["ignore_eos"] = True
    got, reason = run(service, tok, transport, prompt, params)
    assert got == spelled(tok, want, transport)
    if kind == "logit_bias_ban":
        assert want[0] != greedy[0]
    if kind in ("presence_penalty", "frequency_penalty"):
        assert want != greedy, "the penalty must change this repetitive greedy text"
    if kind == "min_tokens_eos":
        assert len(got) == 21 and reason == "stop"  # 20 held back, then the forced EOS
    if kind == "min_tokens_stop_id":
        assert len(got) >= 20
        plain, _ = run(service, tok, transport, prompt, dict(params, min_tokens=0))
        assert len(plain) == 3, "without min_tokens the stop token ends it at the 3rd token"


def test_min_tokens_and_beams_refused_by_name(service):
    r = requests.post(f"{service.http_base}/completions", json={
        "model": "llama", "prompt": [5, 6, 7], "max_tokens": 4, "min_tokens": 5}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens", r.text
    r = requests.post(f"{service.http_base}/completions", json={
        "model": "llama", "prompt": [5, 6, 7], "max_tokens": 4, "logit_bias": {"999999": 1}}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text
    with Client(service.target) as client, pytest.raises(Exception, match="presence_penalty"):
        client.complete([5, 6, 7], SamplingParams(max_tokens=4, beam_width=2, presence_penalty=0.5))
    r = requests.post(f"{service.http_base}/completions", json={
        "model": "llama", "prompt": [5, 6, 7], "max_tokens": 0}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text


# ---- prompt logprobs


def check_prompt_logprobs(want: torch.Tensor, ids: list[int], logprobs: list[float],
                          tops: list[dict[int, float]] | None, k: int) -> None:
    """logprobs[i] is prompt token i + 1's; tops[i] its k alternatives (token id -> logprob)."""
    assert len(logprobs) == len(ids) - 1
    expected = want[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor(logprobs), expected, atol=TOL, rtol=0)
    for i, top in enumerate(tops or ()):
        values, indices = want[i].topk(k)
        assert len(top) == k
        assert torch.allclose(torch.tensor([top[int(t)] for t in indices]), values, atol=TOL, rtol=0)


@pytest.mark.parametrize("cached", [False, True], ids=["cold", "prefix-cache-hit"])
def test_prompt_logprobs_equal_transformers(service, hf, tok, cached):
    ids = random_prompts([61], hf.config.vocab_size, seed=40 + cached)[0]  # 3 prefill chunks, 7 full blocks
    want = hf_logprobs(hf, ids)
    k = 3
    url = f"{service.http_base}/completions"
    if cached:  # put the prompt in the prefix cache; a plain request then hits it
        for _ in range(2):
            r = requests.post(url, json={"model": "llama", "prompt": ids, "max_tokens": 1}, timeout=60).json()
        assert r["usage"]["prompt_tokens_details"]["cached_tokens"] >= 48
    # OpenAI: echo + logprobs + max_tokens 0: the prompt only, first token null.
    body = requests.post(url, json={"model": "llama", "prompt": ids, "echo": True, "logprobs": k, "max_tokens": 0},
                         timeout=60).json()
    (choice,) = body["choices"]
    lp = choice["logprobs"]
    assert choice["text"] == tok.decode(ids, skip_special_tokens=False)
    assert lp["tokens"] == [tok.decode([t], skip_special_tokens=False) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert body["usage"]["completion_tokens"] == 0
    check_prompt_logprobs(want, ids, lp["token_logprobs"][1:], None, k)
    for i, top in enumerate(lp["top_logprobs"][1:]):  # keyed by token text, as OpenAI's
        values, indices = want[i].topk(k)
        expected = {tok.decode([int(t)], skip_special_tokens=False): float(v)
                    for t, v in zip(indices, values, strict=True)}
        assert top.keys() == expected.keys()
        assert all(abs(top[s] - expected[s]) < TOL for s in top)
    # vLLM: prompt_logprobs beside a generated completion.
    body = requests.post(url, json={"model": "llama", "prompt": ids, "prompt_logprobs": k, "max_tokens": 2,
                                    "temperature": 0}, timeout=60).json()
    plp = body["choices"][0]["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    got = [plp[i + 1][str(t)]["logprob"] for i, t in enumerate(ids[1:])]
    ranks = [plp[i + 1][str(t)]["rank"] for i, t in enumerate(ids[1:])]
    assert ranks == [int((want[i] > want[i, t]).sum()) + 1 for i, t in enumerate(ids[1:])]
    tops = [{int(t): v["logprob"] for t, v in e.items() if v["rank"] <= k} for e in plp[1:]]
    check_prompt_logprobs(want, ids, got, tops, k)
    # gRPC: prompt_logprobs in the first response.
    with Client(service.target) as client:
        (c,) = client.complete(ids, SamplingParams(max_tokens=1, prompt_logprobs=k, temperature=0.0))
    assert [p.token_id for p in c.prompt_logprobs] == ids[1:]
    check_prompt_logprobs(want, ids, [p.logprob for p in c.prompt_logprobs],
                          [dict(p.top) for p in c.prompt_logprobs], k)
    if cached:
        assert c.usage.cached_prompt_tokens == 0, "prompt logprobs are computed, not served from the cache"


def test_generate_cli_takes_the_parameters(service, hf, tok):
    """`pagedserve generate` passes --min-tokens, --logit-bias, the penalties and --prompt-logprobs."""
    from tests.e2e.test_chat_serving import cli

    text = "Hello, paged world"
    ids = tok(text).input_ids
    eos = tok.eos_token_id
    proc = cli("generate", "--target", service.target, "--prompt", text, "--max-tokens", "8", "--temperature", "0",
               "--min-tokens", "5", "--logit-bias", f"{eos}=100", "--presence-penalty", "0.5",
               "--frequency-penalty", "0.25", "--prompt-logprobs", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    want = reference(hf, ids, 8, presence=0.5, frequency=0.25, bias={eos: 100.0}, banned_until=(5, {eos}),
                     stop={eos})
    assert out["token_ids"] == want and len(want) == 6 and out["finish_reason"] == "stop"
    lps = hf_logprobs(hf, ids)
    assert [p["token_id"] for p in out["prompt_logprobs"]] == ids[1:]
    assert all(abs(p["logprob"] - float(lps[i, t])) < TOL for i, (p, t) in enumerate(zip(out["prompt_logprobs"],
                                                                                          ids[1:], strict=True)))


def test_echo_streamed_and_with_several_samples(service, hf, tok):
    """A streamed echo opens each choice with the prompt (text and logprobs), then the completion, the
    same as the whole response; with n = 2 every choice echoes the prompt."""
    ids = random_prompts([30], hf.config.vocab_size, seed=5)[0]
    body = {"model": "llama", "prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 3, "temperature": 0}
    url = f"{service.http_base}/completions"
    whole = requests.post(url, json=body, timeout=60).json()["choices"][0]
    r = requests.post(url, json=dict(body, stream=True), timeout=60, stream=True)
    chunks = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True)
              if line.startswith("data: {")]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    tokens = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    lps = [x for c in chunks for x in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert text == whole["text"] and text.startswith(tok.decode(ids, skip_special_tokens=False))
    assert tokens == whole["logprobs"]["tokens"] and len(tokens) == len(ids) + 3
    assert lps[0] is None and lps[1:] == pytest.approx(whole["logprobs"]["token_logprobs"][1:], abs=1e-5)
    want = hf_logprobs(hf, ids)
    assert lps[len(ids) - 1] == pytest.approx(float(want[len(ids) - 2, ids[-1]]), abs=TOL)
    two = requests.post(url, json=dict(body, n=2, temperature=1.0, seed=3), timeout=60).json()["choices"]
    assert len(two) == 2
    for choice in two:
        assert choice["logprobs"]["tokens"][:len(ids)] == whole["logprobs"]["tokens"][:len(ids)]
        assert choice["logprobs"]["token_logprobs"][1:len(ids)] == pytest.approx(
            whole["logprobs"]["token_logprobs"][1:len(ids)], abs=1e-5)
