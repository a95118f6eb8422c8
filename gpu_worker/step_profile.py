"""Kernel-level profile of a few steps inside a running worker (where a step's device time goes).

Enabled by environment variables read when the worker starts:

- ``PAGEDSERVE_PROFILE_STEPS``: comma-separated windows ``KIND:SKIP:COUNT``. KIND is ``decode``
  (plans whose every sequence computes one token) or ``prefill`` (any other plan: prompt chunks, mixed
  steps); the window covers steps SKIP+1 .. SKIP+COUNT of that kind, counted from the worker's start
  (a benchmark's warm-up steps count too).
- ``PAGEDSERVE_PROFILE_OUT``: a file; one JSON object per window is appended to it.

A window starts and ends with ``torch.cuda.synchronize()`` (so it holds exactly its steps' device
work, and the steps before and after it lose their overlap), and runs torch.profiler over CUDA
activity: each kernel's device time, CUDA-graph replays included. The summary per window: wall time
per step, kernel time per step, the share of the wall time the device was busy, and kernels grouped
by name and by category. Profiling perturbs the run it is in; take throughput figures from runs
without it. ``pagedserve bench throughput --profile-steps`` sets these variables and prints the tables.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import defaultdict
from dataclasses import dataclass

ENV_STEPS = "PAGEDSERVE_PROFILE_STEPS"
ENV_OUT = "PAGEDSERVE_PROFILE_OUT"
KINDS = ("decode", "prefill")

# First match wins; names as the CUDA libraries and our Triton kernels call their kernels.
CATEGORIES = (
    ("collectives", r"nccl"),  # tensor parallelism's all-reduces and the logits' all-gather
    ("attention", r"paged_attention"),
    ("gemm", r"gemm|nvjet|cutlass|xmma|sm90_|cublas"),
    ("rms_norm", r"rms_norm"),
    ("rotary", r"rotary"),
    ("store_kv", r"store_kv"),
    ("silu_and_mul", r"silu"),
    ("copies", r"memcpy|memset|copy"),
    ("sampling", r"argmax|reduce|softmax|topk|sort"),
    ("elementwise", r"elementwise|vectorized|index|gather|scatter|cat"),
)


@dataclass(frozen=True)
class Window:
    kind: str
    skip: int
    count: int


def parse_windows(text: str) -> list[Window]:
    """'decode:100:10,prefill:20:2' -> windows; raises ValueError with the expected form."""
    windows = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        fields = part.split(":")
        if len(fields) != 3 or fields[0] not in KINDS or not all(f.isdigit() for f in fields[1:]) \
                or int(fields[2]) < 1:
            raise ValueError(f"bad profile window {part!r}: expected KIND:SKIP:COUNT with KIND in {KINDS}, "
                             "SKIP >= 0 and COUNT >= 1, e.g. decode:100:10")
        windows.append(Window(fields[0], int(fields[1]), int(fields[2])))
    return windows


def step_kind(plan) -> str:
    if plan.new_seqs or any(n != 1 for n in plan.running_num_scheduled_tokens):
        return "prefill"
    return "decode"


def categorize(name: str) -> str:
    low = name.lower()
    for category, pattern in CATEGORIES:
        if re.search(pattern, low):
            return category
    return "other"


def summarize(kernels: list[tuple[str, float]], wall_us: float, window: Window, top: int = 25) -> dict:
    """kernels: (name, device microseconds) of every kernel in the window."""
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for name, us in kernels:
        entry = by_name[name]
        entry[0] += us
        entry[1] += 1
    category = {name: categorize(name) for name in by_name}
    by_cat: dict[str, float] = defaultdict(float)
    for name, (us, _) in by_name.items():
        by_cat[category[name]] += us
    n = window.count
    kernel_us = sum(us for _, us in kernels)
    names = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    return {
        "kind": window.kind, "skip": window.skip, "steps": n,
        "wall_ms_per_step": wall_us / n / 1e3,
        "kernel_ms_per_step": kernel_us / n / 1e3,
        "device_busy_pct": 100 * kernel_us / wall_us if wall_us > 0 else 0.0,
        "kernels_per_step": len(kernels) / n,
        "categories_ms_per_step": {c: us / n / 1e3 for c, us in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": name[:160], "ms_per_step": us / n / 1e3, "calls_per_step": calls / n,
                         "category": category[name]} for name, (us, calls) in names[:top]],
    }


def format_summary(s: dict) -> str:
    lines = [f"profile of {s['steps']} {s['kind']} steps (after {s['skip']}): wall {s['wall_ms_per_step']:.2f} ms"
             f"/step, kernels {s['kernel_ms_per_step']:.2f} ms/step ({s['device_busy_pct']:.1f}% busy), "
             f"{s['kernels_per_step']:.0f} kernels/step"]
    lines += [f"  {c:<14} {ms:8.3f} ms/step" for c, ms in s["categories_ms_per_step"].items()]
    lines.append("  top kernels (ms/step, calls/step):")
    lines += [f"    {k['ms_per_step']:8.3f} {k['calls_per_step']:6.1f}  {k['category']:<12} {k['name'][:90]}"
              for k in s["top_kernels"]]
    return "\n".join(lines)


class StepProfiler:
    """Call ``observe(plan)`` before each step is launched; windows come from the environment."""

    def __init__(self, windows: list[Window], out_path: str) -> None:
        self.windows = windows
        self.out_path = out_path
        self.seen = dict.fromkeys(KINDS, 0)
        self.active: Window | None = None
        self.prof = None
        self.t0 = 0.0
        self.in_window = 0

    @classmethod
    def from_env(cls) -> StepProfiler | None:
        text = os.environ.get(ENV_STEPS, "")
        if not text:
            return None
        out = os.environ.get(ENV_OUT)
        if not out:
            raise ValueError(f"{ENV_STEPS} is set but {ENV_OUT} (the output file) is not")
        return cls(parse_windows(text), out)

    def observe(self, plan) -> None:
        kind = step_kind(plan)
        if self.active is not None and (kind != self.active.kind or self.in_window == self.active.count):
            self._stop()
        self.seen[kind] += 1
        if self.active is None:
            for w in self.windows:
                if w.kind == kind and self.seen[kind] == w.skip + 1:
                    self._start(w)
                    break
        if self.active is not None:
            self.in_window += 1

    def close(self) -> None:
        if self.active is not None:
            self._stop()

    def _start(self, window: Window) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        self.prof = profile(activities=[ProfilerActivity.CUDA])
        self.prof.start()
        self.active, self.in_window = window, 0
        self.t0 = time.perf_counter()

    def _stop(self) -> None:
        import torch

        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - self.t0) * 1e6
        self.prof.stop()
        kernels = []
        for e in self.prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                kernels.append((e.name, float(e.time_range.elapsed_us())))
        window = Window(self.active.kind, self.active.skip, max(self.in_window, 1))
        summary = summarize(kernels, wall_us, window)
        with open(self.out_path, "a") as f:
            f.write(json.dumps(summary) + "\n")
        self.active, self.prof = None, None
