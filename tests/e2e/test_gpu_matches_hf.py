"""On a GPU (Triton kernels, CUDA graphs), every model family through the engine against transformers
(sdpa) on the same checkpoint, 16 prompts x 64 greedy tokens, EOS ignored. Two checkpoints per family:

fp32, on the demo checkpoint with random weights: every first token equal, at least 95% of positions
equal, logprobs within 0.05 wherever both have generated the same prefix.

bf16, on a checkpoint trained in the test: random weights leave top-1/top-2 logit gaps the size of bf16
rounding, so two correct bf16 implementations (even transformers' bf16 against its own fp32) part ways
on them. A trained model is confident where it has learned, so this checkpoint is the demo one trained
here for a few seconds (tests.factories.make_trained_checkpoint: AdamW, fp32) to memorize 16 seeded
passages of random token ids; continuing one takes attention over the tokens before. The prompts are
prefixes of those passages, so the 64 greedy tokens continue memorized text, with greedy margins like a
real model's. Nothing is downloaded. Against transformers in bf16 the criteria are the fp32 ones: every
first token equal, at least 95% of positions equal, logprobs within 0.05 where the tokens agree.
"""

import random

import pytest
import torch

from gpu_worker.demo_model import ARCHS
from tests.e2e.gpu_shapes import MAX_TOKENS, NUM_PROMPTS, PASSAGE_LEN, TRAIN_STEPS, WIDE, WIDE_LLAMA
from tests.factories import (
    compare_greedy,
    engine_greedy_logprobs,
    hf_greedy_logprobs,
    make_checkpoint,
    make_trained_checkpoint,
)

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]



def _hf_greedy(path, prompts, dtype, device="cuda"):
    return hf_greedy_logprobs(path, prompts, MAX_TOKENS, dtype, device)


def _ours(path, prompts, dtype: str, device="cuda"):
    return engine_greedy_logprobs(path, prompts, MAX_TOKENS, dtype, device, kv_cache_memory="1GiB",
                                  max_num_seqs=NUM_PROMPTS)


def _check(label, got, want, extra=""):
    first, equal, total, worst = compare_greedy(got, want)
    print(f"\n{label}: first tokens {first}/{len(want)}, positions {equal}/{total}, "
          f"worst logprob gap {worst:.4f}{extra}")
    assert first == len(want), f"{label}: first tokens differ"
    assert equal >= 0.95 * total, f"{label}: only {equal}/{total} positions equal"
    assert worst <= 0.05, f"{label}: logprob gap {worst:.4f}"


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_matches_transformers_fp32_on_gpu(arch, tmp_path):
    path = make_checkpoint(tmp_path / arch, arch=arch, **WIDE.get(arch, WIDE_LLAMA))
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 1000) for _ in range(rng.randint(1, 300))] for _ in range(NUM_PROMPTS)]
    _check(f"{arch} fp32 random weights", _ours(path, prompts, "float32"), _hf_greedy(path, prompts, torch.float32))


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_matches_transformers_bf16_on_gpu(arch, tmp_path):
    ckpt = make_trained_checkpoint(tmp_path / arch, arch, device="cuda", steps=TRAIN_STEPS,
                                   num_passages=NUM_PROMPTS, passage_len=PASSAGE_LEN, **WIDE.get(arch, WIDE_LLAMA))
    trained = (f"; trained {TRAIN_STEPS} steps in {ckpt.train_seconds:.1f} s, teacher-forced accuracy "
               f"{ckpt.accuracy:.4f}, logit margin median {ckpt.median_margin:.2f} min {ckpt.min_margin:.2f}")
    assert ckpt.accuracy >= 0.99, f"{arch}: training memorized only {ckpt.accuracy:.2%} of the passages{trained}"
    assert ckpt.median_margin >= 3.0, f"{arch}: trained margins too small{trained}"
    prompts = ckpt.prompts(NUM_PROMPTS, MAX_TOKENS, seed=1)
    hf16 = _hf_greedy(ckpt.path, prompts, torch.bfloat16)
    ours16 = _ours(ckpt.path, prompts, "bfloat16")
    # For the record: how many greedy tokens of each bf16 run are the memorized passage's.
    passage = [(full[len(p):len(p) + MAX_TOKENS], [0.0] * MAX_TOKENS)
               for p, full in zip(prompts, ckpt.passages, strict=True)]
    on_passage = (f"; on the passage: ours {compare_greedy(ours16, passage)[1]}, "
                  f"transformers {compare_greedy(hf16, passage)[1]}")
    _check(f"{arch} bf16 trained", ours16, hf16, on_passage + trained)
