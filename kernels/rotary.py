"""Rotary position embedding applied in place to the first rotary_dim channels of q and k."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kernels._triton import jit, next_power_of_2, use_triton

if TYPE_CHECKING:
    import triton.language as tl


def apply_rotary_ref(
    positions: torch.Tensor,  # [num_tokens] int64
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin_cache: torch.Tensor,  # [max_positions, rotary_dim]: cos in the first half, sin in the second
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox style rotates the two halves of the rotary channels; GPT-J style rotates even/odd pairs."""
    rotary_dim = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)  # [num_tokens, rotary_dim / 2] each
    cos, sin = cos[:, None, :], sin[:, None, :]
    for x in (q, k):
        rot = x[..., :rotary_dim]
        if is_neox:
            x1, x2 = rot.chunk(2, dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
        o1 = (x1.float() * cos - x2.float() * sin).to(x.dtype)
        o2 = (x2.float() * cos + x1.float() * sin).to(x.dtype)
        if is_neox:
            rot.copy_(torch.cat((o1, o2), dim=-1))
        else:
            rot.copy_(torch.stack((o1, o2), dim=-1).flatten(-2))
    return q, k


@jit()
def _rotary_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim], rotated in place
    k_ptr,  # [num_tokens, num_kv_heads, head_dim], rotated in place
    cos_sin_ptr,  # [max_positions, rotary_dim]: cos then sin
    positions_ptr,  # [num_tokens] int64
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,  # power of 2 >= NUM_HEADS
    HALF: tl.constexpr,  # rotary_dim // 2
    HALF_PAD: tl.constexpr,
    IS_NEOX: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token)
    i = tl.arange(0, HALF_PAD)
    cos = tl.load(cos_sin_ptr + pos * stride_cs + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
    if IS_NEOX:  # channel i pairs with i + HALF
        c1 = i
        c2 = i + HALF
    else:  # channel 2i pairs with 2i + 1
        c1 = 2 * i
        c2 = 2 * i + 1
    h = tl.arange(0, HEADS_PAD)
    for which in tl.static_range(2):
        if which == 0:
            base = q_ptr + token * stride_qt
            rows = h[:, None] * stride_qh
            mask = (h < NUM_HEADS)[:, None] & (i < HALF)[None, :]
        else:
            base = k_ptr + token * stride_kt
            rows = h[:, None] * stride_kh
            mask = (h < NUM_KV_HEADS)[:, None] & (i < HALF)[None, :]
        x1 = tl.load(base + rows + c1[None, :], mask=mask, other=0.0)
        x2 = tl.load(base + rows + c2[None, :], mask=mask, other=0.0)
        f1 = x1.to(tl.float32)
        f2 = x2.to(tl.float32)
        tl.store(base + rows + c1[None, :], (f1 * cos - f2 * sin).to(x1.dtype), mask=mask)
        tl.store(base + rows + c2[None, :], (f2 * cos + f1 * sin).to(x1.dtype), mask=mask)


def apply_rotary_triton(positions, q, k, cos_sin_cache, is_neox=True):
    """The Triton path (CPU tensors run under TRITON_INTERPRET=1); rotates q and k in place."""
    if q.dim() != 3 or k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"bad shapes: q {tuple(q.shape)}, k {tuple(k.shape)}")
    num_tokens, num_heads, head_dim = q.shape
    rotary_dim = cos_sin_cache.shape[-1]
    if cos_sin_cache.dim() != 2 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"cos_sin_cache {tuple(cos_sin_cache.shape)} does not fit head_dim {head_dim}")
    if positions.shape != (num_tokens,) or positions.dtype != torch.int64 or not positions.is_contiguous():
        raise ValueError(f"positions must be contiguous int64 [{num_tokens}], got {positions.dtype} "
                         f"{tuple(positions.shape)}")
    if q.dtype != k.dtype or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q {q.dtype} and k {k.dtype} must be one of fp16, bf16, fp32")
    for name, t in (("q", q), ("k", k), ("cos_sin_cache", cos_sin_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, strides {t.stride()}")
    if num_tokens == 0:
        return q, k
    half = rotary_dim // 2
    _rotary_kernel[(num_tokens,)](
        q, k, cos_sin_cache, positions, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        cos_sin_cache.stride(0), NUM_HEADS=num_heads, NUM_KV_HEADS=k.shape[1],
        HEADS_PAD=next_power_of_2(max(num_heads, k.shape[1])), HALF=half, HALF_PAD=next_power_of_2(half),
        IS_NEOX=is_neox, num_warps=4,
    )
    return q, k


def apply_rotary(positions, q, k, cos_sin_cache, is_neox=True):
    if use_triton(q):
        return apply_rotary_triton(positions, q, k, cos_sin_cache, is_neox)
    return apply_rotary_ref(positions, q, k, cos_sin_cache, is_neox)
