"""bf16 on CPU, every model family through the whole engine against transformers, on a checkpoint with
greedy margins like a real model's: the demo checkpoint trained here for 60 AdamW steps to memorize 8
seeded passages of random token ids (tests.factories.make_trained_checkpoint; nothing is downloaded).
Random weights would not do: their top-1/top-2 logit gaps are the size of bf16 rounding.

The prompts are passage prefixes of 4..64 tokens and the 32 greedy tokens continue memorized text. The
criteria are the GPU test's (tests/e2e/test_gpu_matches_hf.py) on a smaller budget: training memorized
the passages, every first token equal, at least 95% of positions equal, logprobs within 0.05 where the
tokens agree.
"""

import pytest
import torch

from gpu_worker.demo_model import ARCHS
from tests.factories import compare_greedy, engine_greedy_logprobs, hf_greedy_logprobs, make_trained_checkpoint

pytestmark = pytest.mark.slow

NUM_PROMPTS, MAX_TOKENS, PASSAGE_LEN, TRAIN_STEPS = 8, 32, 96, 60


@pytest.mark.parametrize("arch", ARCHS)
def test_trained_checkpoint_bf16_matches_transformers_on_cpu(arch, tmp_path):
    ckpt = make_trained_checkpoint(tmp_path / arch, arch, device="cpu", steps=TRAIN_STEPS,
                                   num_passages=NUM_PROMPTS, passage_len=PASSAGE_LEN, seed=len(arch))
    trained = (f"trained {TRAIN_STEPS} steps in {ckpt.train_seconds:.1f} s, teacher-forced accuracy "
               f"{ckpt.accuracy:.4f}, logit margin median {ckpt.median_margin:.2f} min {ckpt.min_margin:.2f}")
    assert ckpt.accuracy >= 0.99, f"{arch}: {trained}"
    assert ckpt.median_margin >= 3.0, f"{arch}: {trained}"

    prompts = ckpt.prompts(NUM_PROMPTS, MAX_TOKENS, seed=1)
    want = hf_greedy_logprobs(ckpt.path, prompts, MAX_TOKENS, torch.bfloat16, device="cpu")
    got = engine_greedy_logprobs(ckpt.path, prompts, MAX_TOKENS, "bfloat16", device="cpu", block_size=16)
    first, equal, total, worst = compare_greedy(got, want)
    passage = [(full[len(p):len(p) + MAX_TOKENS], [0.0] * MAX_TOKENS)
               for p, full in zip(prompts, ckpt.passages, strict=True)]
    print(f"\n{arch} bf16 CPU trained: first tokens {first}/{NUM_PROMPTS}, positions {equal}/{total}, worst "
          f"logprob gap {worst:.4f}; on the passage: ours {compare_greedy(got, passage)[1]}, transformers "
          f"{compare_greedy(want, passage)[1]}; {trained}")
    assert first == NUM_PROMPTS, f"{arch}: first tokens differ"
    assert equal >= 0.95 * total, f"{arch}: only {equal}/{total} positions equal"
    assert worst <= 0.05, f"{arch}: logprob gap {worst:.4f}"
