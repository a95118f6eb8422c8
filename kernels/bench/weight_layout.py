"""kernels/NOTES.md v10: F.linear with the weight stored [out, in] (cuBLAS TN) against the same values
stored [in, out] (a strided view; cuBLAS NN), at the Llama-3-8B linear shapes and decode / prefill
batch sizes. Graph replays for M <= 256 (as the runner's decode steps), do_bench for 8192."""

import torch
import torch.nn.functional as F

from kernels.bench.kernels import bench, bench_graph

SHAPES = (("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336),
          ("lm_head", 128256, 4096))


def main() -> None:
    src = torch.empty(2**30 // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    copy = 2 * 2**30 / bench(lambda: dst.copy_(src)) / 1e6
    print(f"copy {copy:.0f} GB/s", flush=True)
    for name, n, k in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        wt = w.t().contiguous().t()  # same values, stored [K, N]
        for m in (64, 128, 256, 8192):
            if m == 8192 and name == "lm_head":
                continue
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            timer = bench_graph if m <= 256 else bench
            t0, t1 = timer(lambda: F.linear(x, w)), timer(lambda: F.linear(x, wt))  # noqa: B023 (timed here)
            pct0, pct1 = (n * k * 2 / t / 1e6 / copy * 100 for t in (t0, t1))  # weight bytes vs copy bandwidth
            print(f"{name} M={m}: TN {t0 * 1e3:.1f}us ({pct0:.0f}% bw)  NN {t1 * 1e3:.1f}us ({pct1:.0f}%)  "
                  f"NN/TN {t1 / t0:.3f}", flush=True)


if __name__ == "__main__":
    main()
