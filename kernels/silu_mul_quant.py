"""SiLU-and-mul fused with dynamic per-token fp8 (e4m3) quantization: the input of an fp8 SwiGLU MLP's
down projection in one pass. Unfused, the activation writes [M, d] in bf16 and the quantization reads it
back; here each program holds one row's gate and up halves in registers, takes the row's absolute max of
silu(gate) * up and writes the e4m3 row and its scale.

The arithmetic matches the unfused path exactly (silu rounded to the input dtype, the product rounded to
it, then kernels/quant_fp8.py's quantization), so the reference is the composition of the two references.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kernels._triton import jit, next_power_of_2, use_triton
from kernels.activation import silu_and_mul_ref
from kernels.quant_fp8 import empty_fp8_rows, quantize_per_token_ref, row_warps

if TYPE_CHECKING:
    import triton.language as tl


def silu_mul_quant_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, 2 * d] (gate then up) -> (float8_e4m3fn [M, d], scales [M, 1] fp32)."""
    return quantize_per_token_ref(silu_and_mul_ref(x))


@jit()
def _silu_mul_quant_kernel(
    x_ptr,  # [M, 2 * d]
    out_ptr,  # [M, d] float8_e4m3fn
    scale_ptr,  # [M] fp32
    d, stride_x, stride_o,
    BLOCK: tl.constexpr,  # power of 2 >= d
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    h = (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(h), axis=0) / 448.0, 1.0 / (448.0 * 512.0))
    q = tl.clamp(h / scale, -448.0, 448.0)
    tl.store(out_ptr + row * stride_o + cols, q.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


MAX_D = 16384


def silu_mul_quant_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path (CPU tensors run under TRITON_INTERPRET=1)."""
    if x.dim() != 2 or x.shape[-1] % 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [M, 2 * d], contiguous in its last dimension; got {tuple(x.shape)}")
    m, d = x.shape[0], x.shape[1] // 2
    if d > MAX_D:
        raise ValueError(f"d = {d} > {MAX_D} is not supported")
    out, scale = empty_fp8_rows(x, d)
    if m == 0:
        return out, scale
    block = next_power_of_2(d)
    _silu_mul_quant_kernel[(m,)](x, out, scale, d, x.stride(0), out.stride(0), BLOCK=block,
                                 num_warps=row_warps(block))
    return out, scale


def silu_mul_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        return silu_mul_quant_triton(x)
    return silu_mul_quant_ref(x)
