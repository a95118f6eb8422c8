"""apply_rotary: Triton kernel against the PyTorch reference, interpreted on CPU and compiled on GPU."""

import pytest
import torch

from kernels.rotary import apply_rotary_ref, apply_rotary_triton


def check(device, seed, assert_close, tol, num_tokens, num_heads, num_kv_heads, head_dim, rotary_dim, dtype,
          is_neox, max_positions=4096):
    g = torch.Generator(device).manual_seed(seed)
    # q and k as strided views of one fused projection, as the model hands them over.
    qkv = torch.randn((num_tokens, num_heads + 2 * num_kv_heads, head_dim), generator=g, device=device)
    qkv = qkv.to(dtype)
    q, k = qkv[:, :num_heads], qkv[:, num_heads:num_heads + num_kv_heads]
    positions = torch.randint(0, max_positions, (num_tokens,), generator=g, device=device)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, device=device).float() / rotary_dim))
    freqs = torch.arange(max_positions, device=device).float()[:, None] * inv_freq[None, :]
    cos_sin_cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # [max_positions, rotary_dim] fp32
    q_ref, k_ref = q.clone(), k.clone()
    v_before = qkv[:, num_heads + num_kv_heads:].clone()
    out_q, out_k = apply_rotary_triton(positions, q, k, cos_sin_cache, is_neox)
    apply_rotary_ref(positions, q_ref, k_ref, cos_sin_cache, is_neox)
    assert out_q is q and out_k is k
    assert_close(q, q_ref, tol[dtype], "q")
    assert_close(k, k_ref, tol[dtype], "k")
    assert torch.equal(q[..., rotary_dim:], q_ref[..., rotary_dim:])  # channels past rotary_dim untouched
    assert torch.equal(qkv[:, num_heads + num_kv_heads:], v_before)  # v untouched


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("rotary_dim", [64, 32], ids=["full", "partial"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_rotary(interpreter, seed, assert_close, tol, is_neox, rotary_dim, dtype):
    check(interpreter, seed, assert_close, tol, 7, 6, 2, 64, rotary_dim, dtype, is_neox)


@pytest.mark.gpu
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("head_dim,rotary_dim", [(128, 128), (128, 64), (80, 80)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_rotary(cuda, seed, assert_close, tol, is_neox, head_dim, rotary_dim, dtype):
    check(cuda, seed, assert_close, tol, 2000, 32, 8, head_dim, rotary_dim, dtype, is_neox)
