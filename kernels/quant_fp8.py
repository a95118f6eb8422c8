"""Dynamic per-token fp8 (e4m3) quantization of activations: each row x[t] becomes x[t] / s[t] in
float8_e4m3fn with s[t] = max(|x[t]|) / 448, the row's scale, in fp32. One pass over the row: a program
holds the whole row in registers (hidden sizes up to 16384), so x is read once and written once at a
quarter (bf16 -> fp8 plus a scale) of the bytes.

This is what the fp8 linears (gpu_worker/fp8.py) feed ``torch._scaled_mm``'s row-wise scales with. The
SwiGLU MLP's down projection gets its input from kernels/silu_mul_quant.py instead, which fuses the
activation with this quantization.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kernels._triton import jit, next_power_of_2, use_triton

if TYPE_CHECKING:
    import triton.language as tl

FP8_MAX = 448.0  # largest finite float8_e4m3fn
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # a row of zeros gets this scale, not 0 (no division by zero)


def quantize_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x / s as float8_e4m3fn [M, K], s [M, 1] fp32), s = max(|row|) / 448."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(MIN_SCALE)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


@jit()
def _quant_per_token_kernel(
    x_ptr,  # [M, K]
    out_ptr,  # [M, K] float8_e4m3fn
    scale_ptr,  # [M] fp32
    K, stride_x, stride_o,
    BLOCK_K: tl.constexpr,  # power of 2 >= K
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0) / 448.0, 1.0 / (448.0 * 512.0))
    q = tl.clamp(x / scale, -448.0, 448.0)
    tl.store(out_ptr + row * stride_o + cols, q.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


MAX_K = 16384


def quantize_per_token_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path (CPU tensors run under TRITON_INTERPRET=1)."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be 2-D, contiguous in its last dimension; got {tuple(x.shape)} {x.stride()}")
    m, k = x.shape
    if k > MAX_K:
        raise ValueError(f"rows of {k} > {MAX_K} elements are not supported")
    out, scale = empty_fp8_rows(x, k)
    if m == 0:
        return out, scale
    block = next_power_of_2(k)
    _quant_per_token_kernel[(m,)](x, out, scale, k, x.stride(0), out.stride(0), BLOCK_K=block,
                                  num_warps=row_warps(block))
    return out, scale


def empty_fp8_rows(x: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The outputs of a per-token quantization of ``x``'s rows into ``width`` e4m3 values each: the rows
    and their fp32 scales, uninitialised; TypeError for an input dtype the kernels do not read."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x dtype {x.dtype} is not fp16, bf16 or fp32")
    return (torch.empty((x.shape[0], width), dtype=torch.float8_e4m3fn, device=x.device),
            torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device))


def row_warps(block: int) -> int:
    """Warps for a program that holds one row of ``block`` elements: one per 512, 1 to 16."""
    return max(1, min(16, block // 512))


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        return quantize_per_token_triton(x)
    return quantize_per_token_ref(x)
