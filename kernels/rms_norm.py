"""RMSNorm with an optional fused residual add."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kernels._triton import jit, next_power_of_2, use_triton

if TYPE_CHECKING:
    import triton.language as tl


def rms_norm_ref(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (normed, new_residual); with a residual, the input is x + residual and so is new_residual.

    Rounding follows transformers' LlamaRMSNorm: statistics in fp32, scale by weight after the cast.
    """
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x


@jit(do_not_specialize=("eps",))
def _rms_norm_kernel(
    out_ptr,  # [num_tokens, hidden], dtype of weight * x
    residual_out_ptr,  # [num_tokens, hidden]: x + residual; unused without a residual
    x_ptr,  # [num_tokens, hidden]
    residual_ptr,  # [num_tokens, hidden]; unused without a residual
    weight_ptr,  # [hidden]
    eps,
    stride_o, stride_ro, stride_x, stride_r,
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,  # power of 2 >= HIDDEN
    HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # rounded like torch's x + residual
        tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=mask)
    h = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(h * h, axis=0) / HIDDEN + eps)
    normed = (h * inv_rms).to(x.dtype).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(x, weight, eps, residual=None, out=None):
    """The Triton path (CPU tensors run under TRITON_INTERPRET=1); ``out`` may be preallocated."""
    if x.dim() != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"bad shapes: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {residual.dtype} {tuple(residual.shape)} must match x {x.dtype} "
                         f"{tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x dtype {x.dtype} is not fp16, bf16 or fp32")
    for name, t in (("x", x), ("weight", weight), ("residual", residual), ("out", out)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, strides {t.stride()}")
    num_tokens, hidden = x.shape
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    if out is None:
        out = torch.empty((num_tokens, hidden), dtype=out_dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != out_dtype:
        raise ValueError(f"out {out.dtype} {tuple(out.shape)} must be {out_dtype} {tuple(x.shape)}")
    new_residual = x if residual is None else torch.empty_like(x, memory_format=torch.contiguous_format)
    if num_tokens == 0:
        return out, new_residual
    block = next_power_of_2(hidden)
    _rms_norm_kernel[(num_tokens,)](
        out, new_residual, x, residual if residual is not None else x, weight, eps,
        out.stride(0), new_residual.stride(0), x.stride(0),
        residual.stride(0) if residual is not None else 0,
        HIDDEN=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None,
        num_warps=min(16, max(1, block // 512)),
    )
    return out, new_residual


def rms_norm(x, weight, eps, residual=None):
    if use_triton(x):
        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual)
