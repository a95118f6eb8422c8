"""Kernel tests run the Triton code two ways: under Triton's interpreter on CPU tensors (small shapes,
CI) and compiled on a GPU (real shapes, ``-m gpu``). One pytest process runs one of the two modes, as
Triton decides at its import whether ``@triton.jit`` interprets: without CUDA, this file sets
``TRITON_INTERPRET=1`` before the kernels import Triton (on their first launch). If something else
imported Triton first (torch._dynamo does, when a test module imports it during collection), the
interpreter tests skip here and test_interpreter_suite.py reruns them in a fresh process."""

import os
import random

import pytest
import torch

from tests.kernels.triton_interpreter import patch_interpreter

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_in_process() -> bool:
    """Whether Triton in this process interprets (importing it now if nobody has yet)."""
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    return _interpreting() and isinstance(triton.language.zeros, InterpretedFunction)


SUBPROCESS_ENV = "PAGEDSERVE_KERNEL_TESTS_SUBPROCESS"  # set in the rerun: there, skipping would hide tests


@pytest.fixture
def interpreter() -> torch.device:
    """Device for the interpreter tests; skips where they cannot run."""
    if not _interpreting():
        pytest.skip("interpreter tests need TRITON_INTERPRET=1 (the default without CUDA)")
    pytest.importorskip("triton")
    if not interpreter_in_process():
        if os.environ.get(SUBPROCESS_ENV):
            pytest.fail("triton was imported before TRITON_INTERPRET=1 was set")
        pytest.skip("triton was imported compiled before TRITON_INTERPRET=1 was set; "
                    "test_interpreter_suite.py reruns these tests in a fresh process")
    patch_interpreter()
    return torch.device("cpu")


@pytest.fixture
def cuda() -> torch.device:
    """Device for the compiled-kernel tests (mark them ``gpu``); skips without CUDA."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if _interpreting():
        pytest.skip("TRITON_INTERPRET=1 runs only the interpreter tests")
    pytest.importorskip("triton")
    return torch.device("cuda")


@pytest.fixture
def seed() -> int:
    """Fresh random inputs on every run; KERNEL_TEST_SEED=n replays a failure (the seed is printed)."""
    seed = int(os.environ.get("KERNEL_TEST_SEED", random.randrange(2**31)))
    print(f"KERNEL_TEST_SEED={seed}")
    return seed


@pytest.fixture
def assert_close():
    """Relative Frobenius error in float64, and no NaN where the reference has none."""

    def check(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> None:
        assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
        assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} != {ref.dtype}"
        out64, ref64 = out.double().cpu(), ref.double().cpu()
        unwritten = torch.isnan(out64) & ~torch.isnan(ref64)
        assert not unwritten.any(), f"{what}: {int(unwritten.sum())} of {out.numel()} elements NaN"
        err = ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()
        assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"

    return check


# Relative-error bounds per dtype: the kernels round intermediates (attention probabilities, activations)
# to the input dtype where the references keep fp32.
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.fixture
def tol():
    return TOL
