"""store_kv: Triton kernel against the PyTorch reference, interpreted on CPU and compiled on GPU."""

import pytest
import torch

from kernels.store_kv import store_kv_ref, store_kv_triton


def check(device, seed, num_tokens, num_kv_heads, head_dim, block_size, num_blocks, dtype, fused=False):
    g = torch.Generator(device).manual_seed(seed)
    if fused:  # k and v as strided views of one [tokens, q + k + v] projection, as a model produces them
        qkv = torch.randn((num_tokens, 6 * num_kv_heads, head_dim), generator=g, device=device).to(dtype)
        k, v = qkv[:, 4 * num_kv_heads:5 * num_kv_heads], qkv[:, 5 * num_kv_heads:]
    else:
        k = torch.randn((num_tokens, num_kv_heads, head_dim), generator=g, device=device).to(dtype)
        v = torch.randn((num_tokens, num_kv_heads, head_dim), generator=g, device=device).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=g, device=device)[:num_tokens]
    slots[torch.rand(num_tokens, generator=g, device=device) < 0.2] = -1  # padding
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)  # unwritten slots stay NaN
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_triton(k, v, k_cache, v_cache, slots)
    store_kv_ref(k, v, k_ref, v_ref, slots)
    torch.testing.assert_close(k_cache, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("block_size", [1, 16, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_store_kv(interpreter, seed, block_size, dtype):
    check(interpreter, seed, num_tokens=13, num_kv_heads=3, head_dim=80, block_size=block_size,
          num_blocks=-(-32 // block_size), dtype=dtype, fused=dtype == torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [1, 16, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_store_kv(cuda, seed, block_size, dtype):
    check(cuda, seed, num_tokens=3000, num_kv_heads=8, head_dim=128, block_size=block_size,
          num_blocks=8192 // block_size, dtype=dtype, fused=dtype == torch.bfloat16)


@pytest.mark.gpu
def test_gpu_store_kv_wide_heads(cuda, seed):
    check(cuda, seed, num_tokens=500, num_kv_heads=40, head_dim=256, block_size=16, num_blocks=64,
          dtype=torch.bfloat16)
