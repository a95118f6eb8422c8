"""Memory sharing end to end (scheduler + worker processes, fp32 CPU): beam search equals transformers'
generate(num_beams=k, do_sample=False); parallel sampling shares the prompt and reproduces its seeds;
greedy results do not change with prefix caching, chunked prefill, or swap preemption forced by a tiny
pool; a repeated prompt computes none of its cached tokens."""

import random

import pytest
import torch

from scheduler_svc import LLM, SamplingParams
from tests.factories import make_checkpoint

pytestmark = pytest.mark.slow

PROMPT_LENS = [1, 5, 17, 40, 70]
MAX_TOKENS = 24
# (prompt index, beam width, length penalty, early stopping)
BEAM_CASES = [(1, 2, 1.0, False), (2, 4, 1.0, False), (3, 2, 0.5, True), (3, 4, 2.0, "never"), (4, 4, 1.0, False),
              (0, 2, 1.0, False)]
SAMPLED = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=123, n=3, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", arch="llama")


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(1)
    return [[rng.randrange(3, 1000) for _ in range(n)] for n in PROMPT_LENS]


def hf_generate(model, prompt, max_new_tokens=MAX_TOKENS, **kw):
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=2, **kw)
    return [row[len(prompt):].tolist() for row in out]


@pytest.fixture(scope="module")
def hf_greedy(hf, prompts):
    return [hf_generate(hf, p)[0] for p in prompts]


@pytest.fixture(scope="module")
def beam_cases(hf, prompts):
    """Per case: our SamplingParams and transformers' beams. A second stop token that the best beam
    meets early makes hypotheses end at different lengths."""
    cases = []
    for i, k, penalty, early in BEAM_CASES:
        stop = hf_generate(hf, prompts[i], num_beams=k, max_new_tokens=3)[0][1]
        want = hf_generate(hf, prompts[i], num_beams=k, num_return_sequences=k, length_penalty=penalty,
                           early_stopping=early, eos_token_id=[1, stop])
        params = SamplingParams(max_tokens=MAX_TOKENS, beam_width=k, length_penalty=penalty, early_stopping=early,
                                stop_token_ids=(stop,))
        cases.append((prompts[i], params, want))
    return cases


def check_beams(results, beam_cases):
    for r, (_, params, want) in zip(results, beam_cases, strict=True):
        assert len(r.outputs) == params.beam_width
        for out, row in zip(r.outputs, want, strict=True):
            assert row[: len(out.token_ids)] == out.token_ids  # best first, as transformers sorts them
            assert all(t == 2 for t in row[len(out.token_ids):])  # transformers pads shorter beams
            assert out.finish_reason == ("length" if len(out.token_ids) == MAX_TOKENS else "stop")


def greedy_ids(results):
    return [r.outputs[0].token_ids for r in results]


@pytest.fixture(scope="module")
def reference(checkpoint, prompts, beam_cases):
    """The default engine (prefix caching on, large pool): greedy, beams and seeded samples."""
    with LLM(checkpoint, block_size=16) as llm:
        greedy = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
        beams = llm.generate([c[0] for c in beam_cases], [c[1] for c in beam_cases])
        sampled = llm.generate(prompts[2:], SAMPLED)
        one = llm.generate(prompts[2:], SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=123,
                                                       ignore_eos=True))
        # A new prompt twice: the second time only its uncached last block is computed.
        fresh = [7 + (i * 37) % 900 for i in range(40)]
        before = llm.stats()
        (first,) = llm.generate([fresh], SamplingParams(max_tokens=2, temperature=0.0))
        middle = llm.stats()
        (second,) = llm.generate([fresh], SamplingParams(max_tokens=2, temperature=0.0))
        after = llm.stats()
        assert after.num_free_blocks == llm.info.num_blocks and after.num_requests == 0
    cache = (first, second, before, middle, after)
    return greedy, beams, sampled, one, cache


def test_beam_search_equals_transformers(reference, beam_cases):
    check_beams(reference[1], beam_cases)


def test_greedy_equals_transformers(reference, hf_greedy):
    assert greedy_ids(reference[0]) == hf_greedy


def test_parallel_samples_differ_and_sample_zero_samples_as_n_equals_one(reference):
    _, _, sampled, one, _ = reference
    for r, single in zip(sampled, one, strict=True):
        assert [o.index for o in r.outputs] == [0, 1, 2]
        assert all(len(o.token_ids) == MAX_TOKENS for o in r.outputs)
        assert len({tuple(o.token_ids) for o in r.outputs}) == 3
        assert r.outputs[0].token_ids == single.outputs[0].token_ids


def test_a_repeated_prompt_computes_no_cached_token(reference):
    first, second, before, middle, after = reference[4]
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == 32  # two full blocks of 16
    assert middle.num_computed_prompt_tokens - before.num_computed_prompt_tokens == 40
    assert after.num_computed_prompt_tokens - middle.num_computed_prompt_tokens == 40 - 32
    assert after.num_cached_prompt_tokens - middle.num_cached_prompt_tokens == 32
    assert second.outputs[0].token_ids == first.outputs[0].token_ids


def test_prefix_caching_off_gives_the_same_results(checkpoint, prompts, reference):
    with LLM(checkpoint, block_size=16, enable_prefix_caching=False) as llm:
        assert not llm.info.enable_prefix_caching
        greedy = llm.generate(prompts + prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
        assert llm.stats().num_cached_prompt_tokens == 0
    assert greedy_ids(greedy) == greedy_ids(reference[0]) * 2


def test_chunked_prefill_and_swap_preemption_in_a_tiny_pool_give_the_same_results(
    checkpoint, prompts, beam_cases, reference
):
    from gpu_worker.model_config import ModelConfig

    greedy_ref, _, sampled_ref, _, _ = reference
    kv_bytes = 48 * 4 * ModelConfig.from_dir(checkpoint).kv_bytes_per_token(torch.float32)
    # 48 blocks of 4 tokens and 32-token steps: prompts are chunked, and groups do not fit together.
    with LLM(checkpoint, block_size=4, kv_cache_memory=kv_bytes, max_num_batched_tokens=32,
             swap_space=0.01) as llm:
        assert llm.info.num_blocks == 48 and llm.info.num_cpu_blocks > 48
        beams = llm.generate([c[0] for c in beam_cases], [c[1] for c in beam_cases])
        mixed = llm.generate(prompts + prompts[2:], [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)]
                             * len(prompts) + [SAMPLED] * len(prompts[2:]))
        stats = llm.stats()
        assert stats.num_swap_preemptions > 0 and stats.num_preemptions > stats.num_swap_preemptions
        assert stats.num_free_blocks == 48 and stats.num_requests == 0 and stats.num_swapped == 0
    check_beams(beams, beam_cases)
    assert greedy_ids(mixed[: len(prompts)]) == greedy_ids(greedy_ref)
    for r, want in zip(mixed[len(prompts):], sampled_ref, strict=True):
        assert [o.token_ids for o in r.outputs] == [o.token_ids for o in want.outputs]


def test_offline_cli_beam_search_and_samples(checkpoint, prompts, beam_cases, tmp_path):
    import json
    import subprocess
    import sys

    prompt, params, want = beam_cases[1]
    ids_file = tmp_path / "prompts.json"
    ids_file.write_text(json.dumps([prompt]))
    proc = subprocess.run(
        [sys.executable, "-m", "scheduler_svc.cli", "offline", "--model", str(checkpoint), "--prompt-ids",
         str(ids_file), "--max-tokens", str(MAX_TOKENS), "--beam-width", str(params.beam_width),
         "--length-penalty", str(params.length_penalty), "--early-stopping", "false", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    (line,) = [json.loads(x) for x in proc.stdout.splitlines()]
    # Without the extra stop token, transformers' beams with EOS only.
    assert [o["token_ids"] for o in line["outputs"]] == hf_beam_rows(checkpoint, prompt, params.beam_width)


def hf_beam_rows(checkpoint, prompt, k):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    rows = hf_generate(model, prompt, num_beams=k, num_return_sequences=k)
    return [r[: max(i for i, t in enumerate(r) if t != 2) + 1] for r in rows]
