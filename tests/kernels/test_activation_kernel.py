"""silu_and_mul: Triton kernel against the PyTorch reference, interpreted on CPU and compiled on GPU."""

import pytest
import torch

from kernels.activation import silu_and_mul_ref, silu_and_mul_triton


def check(device, seed, assert_close, tol, shape, dtype):
    g = torch.Generator(device).manual_seed(seed)
    x = (2 * torch.randn(shape, generator=g, device=device)).to(dtype)
    out = torch.full((*shape[:-1], shape[-1] // 2), float("nan"), dtype=dtype, device=device)
    assert silu_and_mul_triton(x, out=out) is out
    assert_close(out, silu_and_mul_ref(x), tol[dtype] / 4, f"{shape} {dtype}")


@pytest.mark.parametrize("shape", [(5, 2 * 1100), (2, 3, 64)], ids=["2d-two-column-blocks", "3d"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_silu_and_mul(interpreter, seed, assert_close, tol, shape, dtype):
    check(interpreter, seed, assert_close, tol, shape, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_silu_and_mul(cuda, seed, assert_close, tol, dtype):
    check(cuda, seed, assert_close, tol, (3000, 2 * 14336), dtype)
