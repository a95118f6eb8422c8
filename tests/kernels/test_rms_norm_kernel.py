"""rms_norm: Triton kernel against the PyTorch reference, interpreted on CPU and compiled on GPU."""

import pytest
import torch

from kernels.rms_norm import rms_norm_ref, rms_norm_triton


def check(device, seed, assert_close, tol, num_tokens, hidden, dtype, weight_dtype, with_residual):
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn((num_tokens, hidden), generator=g, device=device).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=g, device=device)).to(weight_dtype)
    residual = torch.randn((num_tokens, hidden), generator=g, device=device).to(dtype) if with_residual else None
    out_dtype = torch.promote_types(dtype, weight_dtype)
    out = torch.full((num_tokens, hidden), float("nan"), dtype=out_dtype, device=device)
    normed, new_residual = rms_norm_triton(x, weight, 1e-6, residual, out=out)
    normed_ref, residual_ref = rms_norm_ref(x, weight, 1e-6, residual)
    assert normed is out
    assert_close(normed, normed_ref, tol[dtype], "normed")
    if with_residual:
        assert_close(new_residual, residual_ref, 0.0, "residual")  # one rounded add: exact
    else:
        assert new_residual is x


@pytest.mark.parametrize("hidden", [64, 100])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(interpreter, seed, assert_close, tol, hidden, dtype, with_residual):
    check(interpreter, seed, assert_close, tol, 5, hidden, dtype, dtype, with_residual)


def test_rms_norm_fp32_weight(interpreter, seed, assert_close, tol):
    check(interpreter, seed, assert_close, tol, 3, 48, torch.bfloat16, torch.float32, True)


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [4096, 5120, 8192])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_residual", [False, True])
def test_gpu_rms_norm(cuda, seed, assert_close, tol, hidden, dtype, with_residual):
    check(cuda, seed, assert_close, tol, 1000, hidden, dtype, dtype, with_residual)
