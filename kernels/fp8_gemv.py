"""FP8 product for decode-sized batches: out[m, n] = xs[m] * ws[n] * sum_k xq[m, k] * w[n, k], with xq
and w in e4m3, per-token scales xs and per-channel scales ws (the same function as torch._scaled_mm's
row-wise scaling), for M <= 16 rows.

Why: at M = 1 the product is a read of the weight, and cuBLASLt's fp8 GEMMs reached about half of the
copy bandwidth there (BENCHMARKS.md, issue 25). Here each program owns BLOCK_N output channels for all
M rows and streams its [BLOCK_N, K] slice of the weight, contiguous along K, in BLOCK_K tiles: the e4m3
values are widened to bf16 in registers (exact) and multiplied on the tensor cores with fp32
accumulation; the rows are padded to 16, the smallest tl.dot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kernels._triton import cdiv, jit, sm_count, use_triton

if TYPE_CHECKING:
    import triton.language as tl

MAX_M = 16


def fp8_gemv_ref(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """xq [M, K] e4m3, xs [M, 1] fp32, w [N, K] e4m3, ws [N] fp32 -> [M, N] out_dtype, in fp32."""
    return ((xq.float() @ w.float().t()) * xs * ws[None, :]).to(out_dtype)


@jit(do_not_specialize=("M",))
def _fp8_gemv_kernel(
    x_ptr,  # [M, K] e4m3
    xs_ptr,  # [M] fp32
    w_ptr,  # [N, K] e4m3
    ws_ptr,  # [N] fp32
    out_ptr,  # [M, N]
    M, N, K, stride_x, stride_w, stride_o,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, 16)
    n_ok, m_ok = n < N, m < M
    w_rows = w_ptr + n.to(tl.int64)[:, None] * stride_w
    x_rows = x_ptr + m[:, None] * stride_x
    acc = tl.zeros([16, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(x.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))
    xs = tl.load(xs_ptr + m, mask=m_ok, other=0.0)
    ws = tl.load(ws_ptr + n, mask=n_ok, other=0.0)
    out = acc * xs[:, None] * ws[None, :]
    tl.store(out_ptr + m[:, None] * stride_o + n[None, :], out.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def fp8_gemv_triton(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
                    out_dtype: torch.dtype) -> torch.Tensor:
    """The Triton path (CPU tensors run under TRITON_INTERPRET=1)."""
    m, k = xq.shape
    n = w.shape[0]
    if xq.dtype != torch.float8_e4m3fn or w.dtype != torch.float8_e4m3fn or w.shape[1] != k or m > MAX_M:
        raise ValueError(f"need e4m3 xq [M <= {MAX_M}, K] and w [N, K]; got {xq.dtype} {tuple(xq.shape)}, "
                         f"{w.dtype} {tuple(w.shape)}")
    if xs.shape != (m, 1) or ws.shape != (n,) or xs.dtype != torch.float32 or ws.dtype != torch.float32:
        raise ValueError(f"scales must be fp32 [M, 1] and [N]; got {tuple(xs.shape)}, {tuple(ws.shape)}")
    if xq.stride(-1) != 1 or w.stride(-1) != 1 or not xs.is_contiguous() or not ws.is_contiguous():
        raise ValueError("xq and w must be contiguous along K, the scales contiguous")
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0:
        return out
    # Enough programs for two per SM where the width allows: small tiles for narrow outputs.
    block_n = 32 if cdiv(n, 32) >= 2 * sm_count(xq) else 16
    _fp8_gemv_kernel[(cdiv(n, block_n),)](xq, xs, w, ws, out, m, n, k, xq.stride(0), w.stride(0), out.stride(0),
                                          BLOCK_N=block_n, BLOCK_K=256, num_warps=4, num_stages=4)
    return out


def fp8_gemv(xq, xs, w, ws, out_dtype):
    if use_triton(xq):
        return fp8_gemv_triton(xq, xs, w, ws, out_dtype)
    return fp8_gemv_ref(xq, xs, w, ws, out_dtype)
