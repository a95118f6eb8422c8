"""paged_attention: Triton kernel against the PyTorch reference, interpreted on CPU and compiled on GPU."""

import pytest
import torch

from kernels.attention_config import _counters
from kernels.paged_attention import AttentionConfig, paged_attention_ref, paged_attention_triton

# (seq_len, num_queries): decode, whole prefill, prefill chunk after cached context, no queries, ...
MIXED = [(37, 1), (5, 5), (70, 20), (16, 0), (130, 1), (33, 33)]
SMALL_MIXED = [(37, 1), (20, 8), (16, 0), (9, 9)]
GPU_MIXED = [(2048, 512), (1000, 1000), (300, 0), (17, 17)] + [(4096 - 37 * i, 1) for i in range(8)]


def make_batch(device, seed, seqs, num_heads, num_kv_heads, head_dim, block_size, dtype, num_padding=0):
    """A paged batch with blocks in random order; every cache slot and table entry that the batch must
    not read holds NaN (table padding points at an all-NaN block), so a stray read shows in the output."""
    g = torch.Generator(device).manual_seed(seed)
    num_blocks_per_seq = [-(-seq_len // block_size) for seq_len, _ in seqs]
    num_blocks = sum(num_blocks_per_seq) + 1
    poison_block = num_blocks - 1
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    block_tables = torch.full((len(seqs), max(num_blocks_per_seq) + 2), poison_block, dtype=torch.int32,
                              device=device)
    perm = torch.randperm(num_blocks - 1, generator=g, device=device).to(torch.int32)
    first = 0
    for s, ((seq_len, _), n) in enumerate(zip(seqs, num_blocks_per_seq, strict=True)):
        ids = perm[first:first + n]
        first += n
        block_tables[s, :n] = ids
        for cache in (k_cache, v_cache):
            kv = torch.randn((n * block_size, num_kv_heads, head_dim), generator=g, device=device).to(dtype)
            kv[seq_len:] = float("nan")
            cache[ids.long()] = kv.view(n, block_size, num_kv_heads, head_dim)
    num_q = torch.tensor([nq for _, nq in seqs])
    query_start_loc = torch.cat([torch.zeros(1, dtype=torch.long), num_q.cumsum(0)]).to(torch.int32)
    num_tokens = int(query_start_loc[-1]) + num_padding
    q = torch.randn((num_tokens, num_heads, head_dim), generator=g, device=device).to(dtype)
    seq_lens = torch.tensor([seq_len for seq_len, _ in seqs], dtype=torch.int32)
    return q, k_cache, v_cache, block_tables, seq_lens.to(device), query_start_loc.to(device)


def check(device, seed, assert_close, tol, seqs, num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
          dtype=torch.bfloat16, sliding_window=None, config=None, hints=None, num_padding=0):
    q, k_cache, v_cache, block_tables, seq_lens, qsl = make_batch(
        device, seed, seqs, num_heads, num_kv_heads, head_dim, block_size, dtype, num_padding)
    scale = head_dim**-0.5
    max_query_len, max_seq_len = hints or (max(nq for _, nq in seqs), max(sl for sl, _ in seqs))
    ref = paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, qsl, scale, sliding_window)
    n = int(qsl[-1])
    # A second call reuses the split tickets the first left at zero (twice only where it is cheap).
    calls = 2 if q.is_cuda or (config is not None and config.num_splits > 1) else 1
    for call in range(calls):
        out = torch.full_like(q, float("nan"))
        paged_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, qsl, scale, sliding_window,
                               max_query_len, max_seq_len, config=config, out=out)
        assert_close(out[:n], ref[:n], tol[dtype], f"call {call} seqs={seqs} bs={block_size} D={head_dim} {dtype}")
    assert all(not c.any() for c in _counters.values()), "split tickets not reset"


# Interpreter (CPU) at small shapes.

@pytest.mark.parametrize("block_size", [1, 8, 16, 32, 64, 128])
def test_block_sizes(interpreter, seed, assert_close, tol, block_size):
    check(interpreter, seed, assert_close, tol, MIXED, block_size=block_size)


@pytest.mark.parametrize("head_dim", [80, 96, 128, 256])
def test_head_dims(interpreter, seed, assert_close, tol, head_dim):
    check(interpreter, seed, assert_close, tol, MIXED, num_heads=4, num_kv_heads=1, head_dim=head_dim,
          dtype=torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes(interpreter, seed, assert_close, tol, dtype):
    check(interpreter, seed, assert_close, tol, MIXED, num_heads=8, num_kv_heads=2, block_size=8, dtype=dtype)


@pytest.mark.parametrize("heads", [(4, 4), (8, 1), (6, 2)], ids=["mha", "mqa", "group3"])
def test_gqa_groups(interpreter, seed, assert_close, tol, heads):
    check(interpreter, seed, assert_close, tol, MIXED, num_heads=heads[0], num_kv_heads=heads[1])


@pytest.mark.parametrize("window", [1, 7, 40])
def test_sliding_window(interpreter, seed, assert_close, tol, window):
    check(interpreter, seed, assert_close, tol, MIXED, block_size=8, sliding_window=window)


DECODE = [(300, 1), (45, 1), (1, 1), (129, 1)]


@pytest.mark.parametrize("seqs,config", [
    (DECODE, AttentionConfig(block_q=1, block_m=16, tile_n=16, num_splits=4, split_len=32, num_warps=4,
                             num_stages=1)),
    (SMALL_MIXED, AttentionConfig(block_q=4, block_m=16, tile_n=16, num_splits=3, split_len=16, num_warps=4,
                                  num_stages=1)),
], ids=["decode", "mixed"])
def test_split_kv(interpreter, seed, assert_close, tol, seqs, config):
    check(interpreter, seed, assert_close, tol, seqs, config=config)


def test_split_kv_auto_with_window(interpreter, seed, assert_close, tol):
    # Two long decodes: too few programs, so choose_config splits the keys (3 splits of 384).
    check(interpreter, seed, assert_close, tol, [(1000, 1), (777, 1)], sliding_window=500)


def test_wrong_hints_and_padding_tokens(interpreter, seed, assert_close, tol):
    # Hints too small change the launch shape, not the result; padding tokens past the last query are
    # ignored.
    check(interpreter, seed, assert_close, tol, SMALL_MIXED, hints=(1, 1), num_padding=3)


# GPU at real shapes: 32 query heads over 8 KV heads, head_dim 128, unless the test varies it.

GPU_SHAPE = dict(num_heads=32, num_kv_heads=8, head_dim=128)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [1, 8, 16, 32, 64, 128])
def test_gpu_block_sizes(cuda, seed, assert_close, tol, block_size):
    check(cuda, seed, assert_close, tol, GPU_MIXED, **GPU_SHAPE, block_size=block_size)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 80, 96, 256])
def test_gpu_head_dims(cuda, seed, assert_close, tol, head_dim):
    check(cuda, seed, assert_close, tol, GPU_MIXED, **{**GPU_SHAPE, "head_dim": head_dim})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,head_dim", [(torch.float16, 128), (torch.float32, 128),
                                            (torch.float32, 256), (torch.float16, 80)])
def test_gpu_dtypes(cuda, seed, assert_close, tol, dtype, head_dim):
    check(cuda, seed, assert_close, tol, GPU_MIXED, **{**GPU_SHAPE, "head_dim": head_dim}, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [(32, 32), (32, 1), (28, 4)], ids=["mha", "mqa", "group7"])
def test_gpu_gqa_groups(cuda, seed, assert_close, tol, heads):
    check(cuda, seed, assert_close, tol, GPU_MIXED, num_heads=heads[0], num_kv_heads=heads[1], head_dim=128)


@pytest.mark.gpu
def test_gpu_sliding_window(cuda, seed, assert_close, tol):
    check(cuda, seed, assert_close, tol, GPU_MIXED, **GPU_SHAPE, sliding_window=300)


@pytest.mark.gpu
@pytest.mark.parametrize("seqs", [[(32768, 1), (20000, 1)], [(4096 - 7 * i, 1) for i in range(64)],
                                  [(512, 1)] * 256], ids=["long", "batch64", "batch256"])
def test_gpu_decode(cuda, seed, assert_close, tol, seqs):
    check(cuda, seed, assert_close, tol, seqs, **GPU_SHAPE)


@pytest.mark.gpu
def test_gpu_prefill(cuda, seed, assert_close, tol):
    check(cuda, seed, assert_close, tol, [(2048, 2048), (1500, 1500), (3000, 1000)], **GPU_SHAPE)
