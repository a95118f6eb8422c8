"""Lazy Triton for the kernel files: kernels are declared at import and built at their first launch.

Why lazy: Triton decides when it is imported whether ``@triton.jit`` compiles or interprets
(``TRITON_INTERPRET=1``), and the worker imports ``kernels`` on machines without Triton. So importing
``kernels`` never imports Triton; the first launch does, then binds ``tl`` into the kernel's module
(kernel files import it only under ``TYPE_CHECKING`` and use ``from __future__ import annotations``,
which Triton reads as strings). The CPU tests set ``TRITON_INTERPRET=1`` before that first launch.
"""

import functools
import importlib.util
import os

import torch


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class LazyKernel:
    """A ``@triton.jit`` kernel built on first use; ``kernel[grid](...)`` launches it."""

    def __init__(self, fn, do_not_specialize: tuple[str, ...] = ()):
        self.fn = fn
        self.do_not_specialize = do_not_specialize
        self._kernel = None
        functools.update_wrapper(self, fn)

    def __getitem__(self, grid):
        if self._kernel is None:
            import triton
            import triton.language

            self.fn.__globals__["tl"] = triton.language
            if interpreting():
                _patch_interpreter_index()
            self._kernel = triton.jit(self.fn, do_not_specialize=self.do_not_specialize)
        return self._kernel[grid]


def _patch_interpreter_index() -> None:
    """Triton 3.6's interpreter turns scalar tensors into Python ints (loop bounds) with int(array),
    which NumPy >= 2.4 refuses for 1-element arrays; use .item(), which works for either shape."""
    from triton.runtime import interpreter

    if getattr(interpreter, "_pagedserve_index_patch", False):
        return
    patch_tensor = interpreter._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = _patch_lang_tensor
    interpreter._pagedserve_index_patch = True


def jit(do_not_specialize: tuple[str, ...] = ()):
    """Decorator; name the int arguments that vary per step so they do not each get a compile."""
    return lambda fn: LazyKernel(fn, do_not_specialize)


def use_triton(t: torch.Tensor) -> bool:
    """The public functions' switch: CUDA tensors take the Triton kernel, the rest the reference."""
    return t.is_cuda and triton_available()


@functools.cache
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(t: torch.Tensor) -> int:
    """Multiprocessors of the tensor's GPU; the interpreter stands in for an H100."""
    return num_sms(t.device.index if t.device.index is not None else torch.cuda.current_device()) \
        if t.is_cuda else 132


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
