"""Kernels of pagedserve: each file holds a Triton kernel, its checking wrapper and a PyTorch reference.

The public function of each file (``paged_attention``, ``store_kv``, ...) is the one switch between the
two: CUDA tensors take the Triton kernel, anything else the reference.
"""

from kernels.activation import silu_and_mul
from kernels.copy_blocks import copy_blocks
from kernels.paged_attention import paged_attention
from kernels.rms_norm import rms_norm
from kernels.rotary import apply_rotary
from kernels.store_kv import store_kv

__all__ = ["apply_rotary", "copy_blocks", "paged_attention", "rms_norm", "silu_and_mul", "store_kv"]
