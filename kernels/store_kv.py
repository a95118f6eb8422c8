"""Write new tokens' K and V into their cache slots; slot -1 is padding and is skipped.

An fp8 (e4m3) cache stores K / k_scale and V / v_scale (per-layer, per-tensor scales), saturated at the
format's largest value (448) and rounded to nearest; the attention kernels multiply the scales back."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kernels._triton import cdiv, jit, next_power_of_2, use_triton

if TYPE_CHECKING:
    import triton.language as tl


def store_kv_ref(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, slot = block_id * block_size + offset
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    k, v = k[valid], v[valid]
    if is_fp8(k_cache.dtype):
        k, v = quantize_fp8_ref(k, k_scale), quantize_fp8_ref(v, v_scale)
        # Index assignment into float8 tensors is not implemented on CPU: write their bytes.
        k_cache, v_cache, k, v = (t.view(torch.uint8) for t in (k_cache, v_cache, k, v))
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v


FP8_MAX = 448.0  # largest finite float8_e4m3fn


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == torch.float8_e4m3fn


def quantize_fp8_ref(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x / scale, saturated to +-448, rounded to the nearest e4m3 value."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


@jit()
def _store_kv_kernel(
    k_ptr,  # [num_tokens, num_kv_heads, head_dim]
    v_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens] int64
    k_scale, v_scale,  # fp8 caches: stored values are K / k_scale, V / v_scale
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ckb, stride_ckt, stride_ckh, stride_cvb, stride_cvt, stride_cvh,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PER_PROGRAM: tl.constexpr,  # power of 2
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    FP8: tl.constexpr,  # the caches are float8_e4m3fn
):
    token = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * HEADS_PER_PROGRAM + tl.arange(0, HEADS_PER_PROGRAM)
    d = tl.arange(0, HEAD_DIM_PAD)
    mask = (h < NUM_KV_HEADS)[:, None] & (d < HEAD_DIM)[None, :]
    # The K/V loads do not wait for the slot: all three reads are in flight together.
    k = tl.load(k_ptr + token * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + token * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    slot = tl.load(slot_mapping_ptr + token)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    mask &= slot >= 0
    if FP8:
        k = tl.clamp(k.to(tl.float32) / k_scale, -448.0, 448.0)
        v = tl.clamp(v.to(tl.float32) / v_scale, -448.0, 448.0)
    k = k.to(k_cache_ptr.dtype.element_ty)
    v = v.to(v_cache_ptr.dtype.element_ty)
    tl.store(k_cache_ptr + block * stride_ckb + offset * stride_ckt + h[:, None] * stride_ckh + d[None, :],
             k, mask=mask)
    tl.store(v_cache_ptr + block * stride_cvb + offset * stride_cvt + h[:, None] * stride_cvh + d[None, :],
             v, mask=mask)


def store_kv_triton(k, v, k_cache, v_cache, slot_mapping, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """The Triton path (CPU tensors run under TRITON_INTERPRET=1). Two tokens must not share a slot."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if v.shape != k.shape or k_cache.dim() != 4 or k_cache.shape != v_cache.shape \
            or k_cache.shape[2:] != (num_kv_heads, head_dim):
        raise ValueError(f"bad shapes: k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    fp8 = is_fp8(k_cache.dtype)
    if k.dtype != v.dtype or k_cache.dtype != v_cache.dtype or (k.dtype != k_cache.dtype and not fp8):
        raise TypeError(f"dtypes differ: k {k.dtype}, v {v.dtype}, caches {k_cache.dtype}, {v_cache.dtype}")
    if slot_mapping.dtype != torch.int64 or slot_mapping.shape != (num_tokens,) \
            or not slot_mapping.is_contiguous():
        raise ValueError(f"slot_mapping must be contiguous int64 [{num_tokens}], got "
                         f"{slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, strides {t.stride()}")
    if num_tokens == 0:
        return
    head_dim_pad = next_power_of_2(head_dim)
    heads = min(next_power_of_2(num_kv_heads), max(1, 4096 // head_dim_pad))  # <= 4096 elements a program
    _store_kv_kernel[(num_tokens, cdiv(num_kv_heads, heads))](
        k, v, k_cache, v_cache, slot_mapping, float(k_scale), float(v_scale),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HEADS_PER_PROGRAM=heads, HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=k_cache.shape[1], FP8=fp8, num_warps=4,
    )


def store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """``k_scale`` / ``v_scale`` apply to fp8 caches only."""
    if use_triton(k):
        store_kv_triton(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    else:
        store_kv_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
