"""paged_attention's CPU path (SDPA over gathered K/V) against the PyTorch reference: decode rows batched,
prefill chunks with context before them, sequences without queries, padding tokens, GQA, sliding windows;
every slot it must not read holds NaN (make_batch)."""

import pytest
import torch

from kernels import paged_attention
from kernels.paged_attention import paged_attention_ref
from tests.kernels.test_paged_attention_kernel import MIXED, make_batch

CASES = {
    "mixed": MIXED,
    "decode_only": [(37, 1), (130, 1), (1, 1), (16, 1), (17, 1)],
    "prefill_only": [(5, 5), (33, 33), (70, 20)],
    "one_query_each_of_one_token": [(1, 1)],
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (9, 3), (8, 1)])
@pytest.mark.parametrize("sliding_window", [None, 1, 8])
@pytest.mark.parametrize("block_size", [8, 16])
def test_matches_the_reference(case, heads, sliding_window, block_size):
    num_heads, num_kv_heads = heads
    q, k_cache, v_cache, block_tables, seq_lens, qsl = make_batch(
        "cpu", 0, CASES[case], num_heads, num_kv_heads, 32, block_size, torch.float32, num_padding=3)
    ref = paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, qsl, 0.2, sliding_window)
    out = paged_attention(q, k_cache, v_cache, block_tables, seq_lens, qsl, 0.2, sliding_window)
    n = int(qsl[-1])
    assert not out[:n].isnan().any()
    torch.testing.assert_close(out[:n], ref[:n], rtol=1e-5, atol=1e-5)


def test_bfloat16_matches_the_reference():
    q, k_cache, v_cache, block_tables, seq_lens, qsl = make_batch("cpu", 1, MIXED, 8, 2, 64, 16, torch.bfloat16)
    ref = paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, qsl, 0.125)
    out = paged_attention(q, k_cache, v_cache, block_tables, seq_lens, qsl, 0.125)
    n = int(qsl[-1])
    torch.testing.assert_close(out[:n].float(), ref[:n].float(), rtol=2e-2, atol=2e-2)
