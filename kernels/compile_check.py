"""Compile the kernels for sm_90 (H100) without a GPU: ``python -m kernels.compile_check``.

The wrappers run on small CPU tensors with their launches recorded (not run), then each launch is
compiled by Triton for sm_90 with the same constexprs, warps and stages, and ptxas's resource use and
the SASS instruction count are printed. Catches compile-only errors (the interpreter runs Python
semantics, not Triton's) in CI. ``--dump DIR`` also writes each variant's TTGIR, PTX and SASS, so two
versions of a kernel can be diffed without a GPU.
Needs TRITON_INTERPRET unset: compiled and interpreted Triton cannot share a process.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch

from kernels._triton import LazyKernel, bind_triton

_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
          torch.int64: "i64"}


def record_launches(quick: bool) -> list[tuple[str, tuple]]:
    """(label, recorded launch) for the variants the wrappers pick at serving shapes."""
    from kernels.activation import silu_and_mul_triton
    from kernels.copy_blocks import copy_blocks_triton
    from kernels.paged_attention import paged_attention_triton
    from kernels.rms_norm import rms_norm_triton
    from kernels.rotary import apply_rotary_triton
    from kernels.store_kv import store_kv_triton

    def attention(label, num_seqs, seq_len, num_q, heads=(32, 8), head_dim=128, dtype=torch.bfloat16,
                  window=None):
        cache = torch.zeros((4, 16, heads[1], head_dim), dtype=dtype)
        q = torch.zeros((num_seqs * num_q, heads[0], head_dim), dtype=dtype)
        qsl = torch.arange(0, num_seqs * num_q + 1, num_q, dtype=torch.int32)
        paged_attention_triton(q, cache, cache, torch.zeros((num_seqs, 4), dtype=torch.int32),
                               torch.full((num_seqs,), seq_len, dtype=torch.int32), qsl, 0.1, window,
                               num_q, seq_len)
        return label

    labels = [
        attention("decode 1 x 32768 (tile 128, split)", 1, 32768, 1),
        attention("decode 64 x 4096 (tile 64, split)", 64, 4096, 1),
        attention("prefill 8 x 2048", 8, 2048, 2048),
        attention("prefill + decode, sliding window, fp16, D 80, group 7", 2, 4096, 512, (28, 4), 80,
                  torch.float16, 1024),
    ]
    if not quick:
        labels += [
            attention("decode 64 x 512 (tile 128, 2 stages)", 64, 512, 1),
            attention("decode fp32 D 256", 4, 8192, 1, (16, 8), 256, torch.float32),
            attention("prefill fp32 D 256", 2, 512, 512, (16, 8), 256, torch.float32),
        ]
    k = torch.zeros((8, 8, 128), dtype=torch.bfloat16)
    store_kv_triton(k, k, torch.zeros((4, 16, 8, 128), dtype=torch.bfloat16),
                    torch.zeros((4, 16, 8, 128), dtype=torch.bfloat16), torch.zeros(8, dtype=torch.int64))
    labels.append("store_kv")
    caches = [(torch.zeros((4, 16, 8, 128), dtype=torch.bfloat16),) * 2]
    copy_blocks_triton(caches, torch.zeros(1, dtype=torch.int64), torch.ones(1, dtype=torch.int64))
    labels.append("copy_blocks")
    x = torch.zeros((4, 4096), dtype=torch.bfloat16)
    rms_norm_triton(x, torch.zeros(4096, dtype=torch.bfloat16), 1e-6, x)
    labels.append("rms_norm")
    q = torch.zeros((4, 32, 128), dtype=torch.bfloat16)
    apply_rotary_triton(torch.zeros(4, dtype=torch.int64), q, q[:, :8], torch.zeros((16, 128)))
    labels.append("rotary")
    silu_and_mul_triton(torch.zeros((4, 2 * 14336), dtype=torch.bfloat16))
    labels.append("silu_and_mul")
    return list(zip(labels, LazyKernel.recorded, strict=True))


def compile_sm90(lazy: LazyKernel, args: tuple, kwargs: dict):
    """Compile one recorded launch as Triton would specialize it (16-byte divisibility of pointers and
    of ints not marked do_not_specialize)."""
    import triton
    import triton.language
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bind_triton(lazy.fn)
    fn = triton.jit(lazy.fn, do_not_specialize=lazy.do_not_specialize)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = args[i] if i < len(args) else kwargs[name]
        if fn.params[i].is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
            if value % 16 == 0 and value != 0 and name not in lazy.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options=options)


def _cuobjdump(kernel, flag: str) -> str:
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([cuobjdump, flag, f.name], capture_output=True, text=True).stdout


def sass(kernel) -> str:
    return _cuobjdump(kernel, "-sass")


def resources(kernel) -> str:
    report = _cuobjdump(kernel, "--dump-resource-usage")
    usage = next((line.split() for line in report.splitlines() if "REG:" in line), ["?", "?"])
    regs, stack = usage[0].removeprefix("REG:"), usage[1].removeprefix("STACK:")
    # SASS lines look like "/*0070*/ IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28] ;"
    instructions = sum(1 for line in sass(kernel).splitlines() if re.match(r"\s*/\*[0-9a-f]{4,}\*/", line))
    return (f"{regs:>4s} regs, {stack:>5s} B stack (spills), {kernel.metadata.shared:>6d} B shared, "
            f"{instructions:>5d} SASS instructions")


def dump(kernel, directory: str, index: int, name: str) -> None:
    """Write the variant's TTGIR, PTX and SASS as DIR/NN_name.{ttgir,ptx,sass}."""
    os.makedirs(directory, exist_ok=True)
    stem = os.path.join(directory, f"{index:02d}_{name.strip('_')}")
    for suffix, text in (("ttgir", kernel.asm["ttgir"]), ("ptx", kernel.asm["ptx"]), ("sass", sass(kernel))):
        with open(f"{stem}.{suffix}", "w") as f:
            f.write(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer attention variants (CI)")
    parser.add_argument("--dump", metavar="DIR", help="write each variant's TTGIR, PTX and SASS into DIR")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: compiled and interpreted Triton cannot share a process")
    LazyKernel.recorded = []
    try:
        launches = record_launches(args.quick)
    finally:
        LazyKernel.recorded = None
    for index, (label, (lazy, _grid, launch_args, kwargs)) in enumerate(launches):
        kernel = compile_sm90(lazy, launch_args, dict(kwargs))
        print(f"{label:58s} {lazy.__name__:26s} {resources(kernel)}", flush=True)
        if args.dump:
            dump(kernel, args.dump, index, lazy.__name__)


if __name__ == "__main__":
    sys.exit(main())
