"""The transformers reference of test_gpu_matches_hf, checked on CPU where the engine is exact: with
``ignore_eos`` the engine keeps an EOS it picks and goes on, so the reference must neither stop at EOS
nor suppress it (``min_new_tokens`` did: it masks EOS, transformers then took the runner-up, and the GPU
test counted that as a mismatch of the engine, up to 3.4 in logprob)."""

import random

import pytest

from gpu_worker.demo_model import EOS_ID
from tests.e2e.test_gpu_matches_hf import MAX_TOKENS, WIDE_LLAMA, _hf_greedy, _ours
from tests.factories import compare_greedy, make_checkpoint

pytestmark = pytest.mark.slow


def test_reference_and_engine_agree_past_a_greedy_eos(tmp_path):
    import torch

    path = make_checkpoint(tmp_path / "qwen2", arch="qwen2", **WIDE_LLAMA)
    rng = random.Random(1)  # the GPU test's prompts; on this checkpoint prompt 8's argmax is EOS at step 9
    prompts = [[rng.randrange(3, 1000) for _ in range(rng.randint(1, 300))] for _ in range(16)][8:9]
    want = _hf_greedy(path, prompts, torch.float32, device="cpu")
    got = _ours(path, prompts, "float32", device="cpu")
    first, equal, total, worst = compare_greedy(got, want)
    assert (first, equal) == (1, MAX_TOKENS), f"positions {equal}/{total}"
    assert worst <= 1e-3, f"logprob gap {worst:.4f}"
    assert EOS_ID in want[0][0], "no greedy EOS: the case tests nothing"
