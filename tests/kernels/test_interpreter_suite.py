"""Reruns the interpreter tests in a fresh process when this one cannot interpret: Triton fixes its
mode when first imported, and another test package may import it (through torch._dynamo) before
tests/kernels/conftest.py sets TRITON_INTERPRET=1."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # reruns the kernel tests in a process of their own

SUBPROCESS_ENV = "PAGEDSERVE_KERNEL_TESTS_SUBPROCESS"  # as in conftest.py (not importable by name)


def interpreter_in_process() -> bool:
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    return os.environ.get("TRITON_INTERPRET") == "1" and isinstance(triton.language.zeros, InterpretedFunction)


def test_interpreter_suite_in_fresh_process():
    if torch.cuda.is_available() or os.environ.get(SUBPROCESS_ENV):
        pytest.skip("GPU machines run the compiled tests; the rerun does not rerun itself")
    pytest.importorskip("triton")
    if interpreter_in_process():
        pytest.skip("the interpreter tests ran in this process")
    here = Path(__file__).resolve().parent
    env = {**os.environ, "TRITON_INTERPRET": "1", SUBPROCESS_ENV: "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", str(here),
         "--deselect", f"{here / 'test_compile_check.py'}::test_kernels_compile_for_sm90"],
        cwd=here.parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
