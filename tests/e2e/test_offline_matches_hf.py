"""The offline engine (scheduler + worker processes over gRPC and ZeroMQ) against transformers:
greedy token ids identical in fp32 on CPU, with block size 16, block size 1, and a pool so small that
recompute preemption happens."""

import json
import random
import subprocess
import sys

import pytest
import torch

from scheduler_svc import LLM, SamplingParams
from tests import factories
from tests.factories import make_checkpoint

pytestmark = pytest.mark.slow

PROMPT_LENS = [1, 3, 17, 40, 64, 111, 200, 300]
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", arch="llama")


@pytest.fixture(scope="module")
def prompts(checkpoint):
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(checkpoint).vocab_size
    rng = random.Random(0)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def hf_greedy(checkpoint, prompts):
    return factories.hf_greedy(checkpoint, prompts, MAX_TOKENS)


def _check_equal(results, hf_greedy, eos_ids):
    assert len(results) == len(hf_greedy)
    for i, (r, want) in enumerate(zip(results, hf_greedy, strict=True)):
        (out,) = r.outputs
        assert out.token_ids == want, f"prompt {i} (len {PROMPT_LENS[i]})"
        expected_reason = "stop" if want and want[-1] in eos_ids else "length"
        assert out.finish_reason == expected_reason


@pytest.mark.parametrize("block_size", [16, 1])
def test_greedy_equals_transformers(checkpoint, prompts, hf_greedy, block_size):
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    with LLM(checkpoint, block_size=block_size) as llm:
        results = llm.generate(prompts, greedy)
        _check_equal(results, hf_greedy, set(llm.info.eos_token_ids))
        stats = llm.stats()
        assert stats.num_free_blocks == llm.info.num_blocks and stats.num_requests == 0
        assert stats.num_ahead_steps > 0, "no decode step was planned ahead (async scheduling is on by default)"


def test_greedy_equals_transformers_with_async_scheduling_off(checkpoint, prompts, hf_greedy):
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    with LLM(checkpoint, block_size=16, async_scheduling=False) as llm:
        results = llm.generate(prompts, greedy)
        _check_equal(results, hf_greedy, set(llm.info.eos_token_ids))
        stats = llm.stats()
        assert stats.num_ahead_steps == 0 and stats.num_steps > MAX_TOKENS
        assert stats.num_free_blocks == llm.info.num_blocks and stats.num_requests == 0


def test_greedy_equals_transformers_under_recompute_preemption(checkpoint, prompts, hf_greedy):
    from gpu_worker.model_config import ModelConfig

    cfg = ModelConfig.from_dir(checkpoint)
    # 48 blocks of 16 tokens: the longest request (300 + 64) fits alone, all 8 together do not.
    kv_bytes = 48 * 16 * cfg.kv_bytes_per_token(torch.float32)
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    with LLM(checkpoint, block_size=16, kv_cache_memory=kv_bytes) as llm:
        assert llm.info.num_blocks == 48
        results = llm.generate(prompts, greedy)
        stats = llm.stats()
        assert stats.num_preemptions > 0, "the pool was meant to force preemption"
        _check_equal(results, hf_greedy, set(llm.info.eos_token_ids))
        assert stats.num_free_blocks == 48


def test_bad_input_raises_value_error_and_leaves_nothing_allocated(checkpoint):
    with LLM(checkpoint, block_size=16) as llm:
        vocab, max_len = llm.info.vocab_size, llm.info.max_model_len
        cases = [
            (lambda: llm.generate([[]]), "prompts[0]"),
            (lambda: llm.generate([""]), "prompts[0]"),
            (lambda: llm.generate([[5, 6], [1] * max_len]), "prompts[1]"),
            (lambda: llm.generate([[5, vocab]]), "prompts[0]"),
            (lambda: llm.generate([[5, -1]]), "prompts[0]"),
            (lambda: llm.generate([[5]], SamplingParams(max_tokens=0)), "max_tokens"),
            (lambda: llm.generate([[5]], SamplingParams(top_p=1.5)), "top_p"),
            (lambda: llm.generate([[5]], SamplingParams(top_p=0.0)), "top_p"),
            (lambda: llm.generate([[5]], SamplingParams(temperature=-1.0)), "temperature"),
        ]
        for call, field in cases:
            with pytest.raises(ValueError) as err:
                call()
            assert getattr(err.value, "field", None) == field, err.value
        stats = llm.stats()
        assert stats.num_free_blocks == llm.info.num_blocks and stats.num_requests == 0
        # still serving afterwards
        (r,) = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
        assert len(r.outputs[0].token_ids) == 3


def test_offline_cli_prints_one_json_object_per_prompt(checkpoint, prompts, hf_greedy, tmp_path):
    ids_file = tmp_path / "prompts.json"
    ids_file.write_text(json.dumps(prompts[:3]))
    proc = subprocess.run(
        [sys.executable, "-m", "scheduler_svc.cli", "offline", "--model", str(checkpoint),
         "--prompt-ids", str(ids_file), "--max-tokens", str(MAX_TOKENS), "--temperature", "0", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2]
    for line, want in zip(lines, hf_greedy[:3], strict=True):
        (out,) = line["outputs"]
        assert out["token_ids"] == want
        assert out["finish_reason"] in ("length", "stop") and isinstance(out["text"], str)


def test_prompt_logprobs_survive_preemption(checkpoint, prompts, hf_greedy):
    """Prompt logprobs through the offline API equal transformers' teacher-forced log-softmax, each
    position reported once although preemption recomputes prompts; generation is unchanged."""
    from transformers import AutoModelForCausalLM

    from gpu_worker.model_config import ModelConfig

    cfg = ModelConfig.from_dir(checkpoint)
    kv_bytes = 48 * 16 * cfg.kv_bytes_per_token(torch.float32)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, prompt_logprobs=2)
    with LLM(checkpoint, block_size=16, kv_cache_memory=kv_bytes) as llm:
        results = llm.generate(prompts, params)
        assert llm.stats().num_preemptions > 0, "the pool was meant to force preemption"
        _check_equal(results, hf_greedy, set(llm.info.eos_token_ids))
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    for r, ids in zip(results, prompts, strict=True):
        with torch.inference_mode():
            want = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        assert len(r.prompt_logprobs) == (len(ids) if len(ids) > 1 else 0)
        if len(ids) == 1:
            continue
        assert r.prompt_logprobs[0] is None
        expected = want[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        assert torch.allclose(torch.tensor(r.prompt_logprobs[1:]), expected, atol=1e-4, rtol=0)
        for i, top in enumerate(r.prompt_top_logprobs[1:]):
            values, indices = want[i].topk(2)
            assert [t for t, _ in top] == indices.tolist()
            assert torch.allclose(torch.tensor([v for _, v in top]), values, atol=1e-4, rtol=0)
