"""SiLU-and-mul: the gated activation of SwiGLU MLPs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kernels._triton import cdiv, jit, use_triton

if TYPE_CHECKING:
    import triton.language as tl


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:  # x: [num_tokens, 2 * d] -> [num_tokens, d]
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


@jit()  # d stays specialized: its divisibility by 16 lets the up-half loads be 16 bytes wide
def _silu_and_mul_kernel(
    out_ptr,  # [num_rows, d]
    x_ptr,  # [num_rows, 2 * d]: gate then up
    d,
    stride_o, stride_x,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # rounded like torch's F.silu output
    tl.store(out_ptr + row * stride_o + cols, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype),
             mask=mask)


def silu_and_mul_triton(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton path (CPU tensors run under TRITON_INTERPRET=1); ``out`` may be preallocated."""
    if x.shape[-1] % 2 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be fp16/bf16/fp32 [..., 2 * d], got {x.dtype} {tuple(x.shape)}")
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if out is None:
        out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    elif out.shape != (*x.shape[:-1], d) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out {out.dtype} {tuple(out.shape)} must be contiguous {x.dtype} "
                         f"{(*x.shape[:-1], d)}")
    num_rows = x2.shape[0]
    if num_rows == 0 or d == 0:
        return out
    block = 1024
    _silu_and_mul_kernel[(num_rows, cdiv(d, block))](out, x2, d, d, x2.stride(0), BLOCK=block, num_warps=4)
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        return silu_and_mul_triton(x)
    return silu_and_mul_ref(x)
