"""``python -m scheduler_svc.bench.fp8_parts``: where an FP8 decode step of Llama-3-8B spends its time, part by
part, bf16 beside fp8 (CUDA only): the four linears of a layer (bf16 F.linear against per-token
quantization + torch._scaled_mm, and the quantization alone) and paged attention over a bf16 and an
e4m3 cache, at W8B's decode shapes (batch 256, 640-token contexts) and at batch 1. Each time is the
median of triton.testing.do_bench (L2 flushed) with its share of the bytes' time at the measured copy
bandwidth, so the table says which part keeps the step from its roofline."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

# W8B's linears per layer: name, (out, in).
LINEARS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3  # seconds


def linear_rows(m: int, bw: float) -> list[str]:
    rows = []
    for name, (n, k) in LINEARS.items():
        rows += _linear_rows(name, n, k, m, bw)
    return rows


def _linear_rows(name: str, n: int, k: int, m: int, bw: float) -> list[str]:
    import gpu_worker.fp8 as fp8_mod
    from kernels.quant_fp8 import quantize_per_token
    from kernels.silu_mul_quant import silu_mul_quant

    lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(lin.weight, std=0.02)
    f8 = fp8_mod.Fp8Linear.from_linear(lin)
    if name == "down":  # its input comes from gate_up: SiLU-and-mul first (fused with the quantization)
        x = torch.randn(m, 2 * k, device="cuda", dtype=torch.bfloat16)
        t_bf16 = bench(lambda: F.linear(F.silu(x[:, :k]) * x[:, k:], lin.weight))
        t_quant = bench(lambda: silu_mul_quant(x))

        def run():
            return f8.forward_quantized(*silu_mul_quant(x), torch.bfloat16)
    else:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        t_bf16 = bench(lambda: F.linear(x, lin.weight))
        t_quant = bench(lambda: quantize_per_token(x))

        def run():
            return f8(x)
    saved = fp8_mod.GEMV_MAX_M
    fp8_mod.GEMV_MAX_M = 0  # torch._scaled_mm at every M
    t_fp8 = bench(run)
    fp8_mod.GEMV_MAX_M = saved
    floor_bf16, floor_fp8 = 2 * n * k / bw, n * k / bw
    rows = [f"| {name} M={m} | {t_bf16 * 1e6:.1f} ({100 * floor_bf16 / t_bf16:.0f}%) | "
            f"{t_fp8 * 1e6:.1f} ({100 * floor_fp8 / t_fp8:.0f}%) | {t_quant * 1e6:.1f} | {t_bf16 / t_fp8:.2f}x |"]
    if m <= 16:  # the same product through kernels/fp8_gemv.py, the small-M alternative
        fp8_mod.GEMV_MAX_M = 16
        t_gemv = bench(run)
        fp8_mod.GEMV_MAX_M = saved
        rows.append(f"| {name} M={m} via fp8_gemv | | {t_gemv * 1e6:.1f} ({100 * floor_fp8 / t_gemv:.0f}%) | "
                    f"| {t_bf16 / t_gemv:.2f}x |")
    return rows


def attention_rows(batch: int, ctx: int, bw: float) -> list[str]:
    kv_heads, d, bs = 8, 128, 16
    per_seq = -(-ctx // bs)
    tables = torch.randperm(batch * per_seq, device="cuda", dtype=torch.int32).view(batch, per_seq)
    times = {dtype: _attention_time(batch, ctx, tables, dtype) for dtype in (torch.bfloat16, torch.float8_e4m3fn)}
    rows = []
    for dtype, t in times.items():
        floor = 2 * batch * ctx * kv_heads * d * (1 if dtype == torch.float8_e4m3fn else 2) / bw
        rows.append(f"| attention B={batch} ctx={ctx} {str(dtype).removeprefix('torch.')} | "
                    f"{t * 1e6:.1f} | {100 * floor / t:.0f}% |")
    rows.append(f"| fp8 / bf16 time | {times[torch.float8_e4m3fn] / times[torch.bfloat16]:.2f} | |")
    return rows


def _attention_time(batch: int, ctx: int, tables: torch.Tensor, dtype: torch.dtype) -> float:
    from kernels.paged_attention import paged_attention_triton

    heads, kv_heads, d, bs = 32, 8, 128, 16
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    starts = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, heads, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(tables.numel(), bs, kv_heads, d, device="cuda").to(dtype)
    v = torch.randn(tables.numel(), bs, kv_heads, d, device="cuda").to(dtype)
    return bench(lambda: paged_attention_triton(q, k, v, tables, lens, starts, d**-0.5, max_query_len=1,
                                                max_seq_len=ctx))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.parse_args(argv)
    from kernels.bench.ceilings import measure_ceilings

    bw = measure_ceilings("cuda")["copy_gbps"] * 1e9
    print(f"{torch.cuda.get_device_name()}; copy bandwidth {bw / 1e12:.2f} TB/s")
    print("| linear | bf16 us (% of bytes floor) | fp8 us, _scaled_mm, incl. quantization (% of fp8 bytes floor) | "
          "quantization us | speed-up |\n|---|---|---|---|---|")
    for m in (1, 256):
        print("\n".join(linear_rows(m, bw)), flush=True)
    print("\n| attention (decode) | us | % of bytes floor |\n|---|---|---|")
    for batch, ctx in ((256, 640), (1, 640)):
        print("\n".join(attention_rows(batch, ctx, bw)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
