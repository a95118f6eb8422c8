"""Lazy Triton for the kernel files: kernels are declared at import and built at their first launch.

Why lazy: Triton decides when it is imported whether ``@triton.jit`` compiles or interprets
(``TRITON_INTERPRET=1``), and the worker imports ``kernels`` on machines without Triton. So importing
``kernels`` never imports Triton; the first launch does, then binds ``tl`` into the kernel's module
(kernel files import it only under ``TYPE_CHECKING`` and use ``from __future__ import annotations``,
which Triton reads as strings), and turns the module's ``@jit_helper`` functions into ``@triton.jit``
ones, which the kernel calls and Triton inlines. The CPU tests set ``TRITON_INTERPRET=1`` before that
first launch.
"""

import functools
import importlib.util

import torch


@functools.cache
def triton_available() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


class LazyKernel:
    """A ``@triton.jit`` kernel built on first use; ``kernel[grid](...)`` launches it."""

    # When a list, launches are recorded here instead of run (kernels.compile_check).
    recorded: list | None = None

    def __init__(self, fn, do_not_specialize: tuple[str, ...] = ()):
        self.fn = fn
        self.do_not_specialize = do_not_specialize
        self._kernel = None
        functools.update_wrapper(self, fn)

    def __getitem__(self, grid):
        if LazyKernel.recorded is not None:
            return lambda *args, **kwargs: LazyKernel.recorded.append((self, grid, args, kwargs))
        if self._kernel is None:
            import triton

            bind_triton(self.fn)
            self._kernel = triton.jit(self.fn, do_not_specialize=self.do_not_specialize)
        return self._kernel[grid]


class LazyHelper:
    """A device function that kernels of its module call: becomes ``triton.jit(fn)`` in the module's
    globals when the first of them is built (Triton resolves calls through the caller's globals)."""

    def __init__(self, fn):
        self.fn = fn
        functools.update_wrapper(self, fn)


def bind_triton(fn) -> None:
    """Make ``fn``'s module ready for Triton to parse: bind ``tl``, and replace each ``LazyHelper``
    there with its ``@triton.jit`` function (interpreted under ``TRITON_INTERPRET=1``). Idempotent."""
    import triton
    import triton.language

    module_globals = fn.__globals__
    module_globals["tl"] = triton.language
    for name, value in list(module_globals.items()):
        if isinstance(value, LazyHelper):
            module_globals[name] = triton.jit(value.fn)


def jit(do_not_specialize: tuple[str, ...] = ()):
    """Decorator; name the int arguments that vary per step so they do not each get a compile."""
    return lambda fn: LazyKernel(fn, do_not_specialize)


def jit_helper(fn):
    """Decorator for device functions called from ``@jit`` kernels of the same module; Triton inlines
    them, so splitting a kernel into helpers leaves its compiled code unchanged."""
    return LazyHelper(fn)


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
    # scheduler_svc/kv_cache_manager.py has the same line: the scheduler must not import kernels (torch).
    return -(-a // b)
