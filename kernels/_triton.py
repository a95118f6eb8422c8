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
import os

import torch


@functools.cache
def triton_available() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
            if interpreting():
                _patch_interpreter()
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


def _patch_interpreter() -> None:
    """Four gaps of Triton 3.6's interpreter that the CPU tests hit, patched for the interpreter only:
    scalar tensors used as loop bounds go through int(array), which NumPy >= 2.4 refuses for 1-element
    arrays (use .item()); tl.dot multiplies bf16 operands as their raw uint16 bits (widen them to fp32
    first, which is exact); fp32 -> bf16 casts truncate where GPUs round to nearest even; fp32 -> e4m3
    casts lose the carry of a mantissa rounded up."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    if getattr(interpreter, "_pagedserve_patched", False):
        return
    patch_tensor = interpreter._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    create_dot = interpreter.InterpreterBuilder.create_dot

    def widen(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        data = (x.data.astype(np.uint32) << 16).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    cast_impl = interpreter.InterpreterBuilder.cast_impl

    def _cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = src.data.astype(np.float32).view(np.uint32)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            rounded = np.where(np.isnan(src.data), np.uint16(0x7FC0), rounded)
            return interpreter.TensorHandle(rounded, tl.bfloat16)
        return cast_impl(self, src, dst_type)

    fp_to_fp = interpreter.InterpreterBuilder.create_fp_to_fp

    def _create_fp_to_fp(self, src, dst_type, rounding_mode):
        # fp32 -> e4m3: the interpreter drops the carry of a rounded-up mantissa (1.99 -> 1.0); torch rounds
        # to nearest even like the GPU (saturation is the kernels' own clamp).
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.float8e4nv:
            data = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.float8_e4m3fn)
            return interpreter.TensorHandle(data.view(torch.uint8).numpy(), tl.float8e4nv)
        return fp_to_fp(self, src, dst_type, rounding_mode)

    interpreter.InterpreterBuilder.create_fp_to_fp = _create_fp_to_fp
    interpreter._patch_lang_tensor = _patch_lang_tensor
    interpreter.InterpreterBuilder.create_dot = _create_dot
    interpreter.InterpreterBuilder.cast_impl = _cast_impl
    interpreter._pagedserve_patched = True


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
    return -(-a // b)
