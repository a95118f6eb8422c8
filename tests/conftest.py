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

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
