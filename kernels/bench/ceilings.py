"""The two ceilings of a device that the benchmarks measure their figures against: copy bandwidth
(bytes read plus bytes written, GB/s = 1e9 bytes/s) and dense matmul rate (TFLOP/s = 1e12 FLOP/s), in
bf16 on CUDA and fp32 on CPU. ``python -m kernels.bench`` prints them before its tables and
``pagedserve bench throughput`` builds its roofline on them."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

GiB = 1 << 30


def measure_ceilings(device: str = "cuda") -> dict[str, float]:
    """{"copy_gbps": GB/s, "matmul_tflops": TFLOP/s} of ``device``: a 1 GiB copy (256 MiB on CPU) and
    an 8192 x 8192 matmul (1024 on CPU), median over repeated runs."""
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    ceilings = {"copy_gbps": _copy_gbps(device, dtype, GiB if cuda else 256 * 2**20),
                "matmul_tflops": _matmul_tflops(device, dtype, 8192 if cuda else 1024)}
    if cuda:
        torch.cuda.empty_cache()
    return ceilings


def _copy_gbps(device: str, dtype: torch.dtype, num_bytes: int) -> float:
    src = torch.empty(num_bytes // dtype.itemsize, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    return 2 * num_bytes / median_seconds(lambda: dst.copy_(src), device) / 1e9


def _matmul_tflops(device: str, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    return 2 * n**3 / median_seconds(lambda: a @ b, device) / 1e12


def median_seconds(fn: Callable[[], object], device: str, reps: int = 20, warmup: int = 10) -> float:
    """Median wall time of ``fn`` after ``warmup`` calls (clocks up, caches and kernels chosen); on CUDA
    timed by events on the current stream."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)
