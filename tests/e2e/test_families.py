"""Every model family through the whole engine (scheduler + worker processes) against transformers:
greedy token ids identical, fp32 on CPU, 8 prompts x 32 tokens submitted together."""

import pytest

from gpu_worker.demo_model import ARCHS, VOCAB_SIZE
from scheduler_svc import LLM, SamplingParams
from tests.factories import hf_greedy, make_checkpoint, random_prompts

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("arch", ARCHS)
def test_family_greedy_equals_transformers(arch, tmp_path):
    path = make_checkpoint(tmp_path / arch, arch=arch)
    prompts = random_prompts([1, 5, 16, 17, 33, 64, 90, 150], VOCAB_SIZE, seed=len(arch))
    want = hf_greedy(path, prompts, 32)
    with LLM(path, block_size=16) as llm:
        got = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0))
    for i, (r, w) in enumerate(zip(got, want, strict=True)):
        assert r.outputs[0].token_ids == w, f"{arch}: prompt {i} (len {len(prompts[i])})"
