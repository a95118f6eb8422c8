"""Triton 3.6 interpreter fixes that the CPU kernel tests need. They live with the tests: production
never interprets (CUDA tensors take the compiled kernels, CPU tensors the PyTorch references)."""

import torch


def patch_interpreter() -> None:
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
