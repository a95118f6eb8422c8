"""Old against new paged-attention kernel on a CUDA GPU: same output, same speed.

    PYTHONPATH=$PWD python -m kernels.bench.attention_split_check /tmp/old_paged_attention.py

OLD is a copy of kernels/paged_attention.py from before a change (written for the split of the kernel
into @jit_helper functions), loaded from its path as a module of its own; NEW is this tree's
kernels.paged_attention. On the decode and prefill cells of kernels/bench/kernels.py's tables both run
with the same launch config (choose_config, checked equal). Checks: the two bf16 outputs are equal
(max abs difference <= --atol, 0 by default: the split must not change the arithmetic) and finite, and
on the cells small enough for the PyTorch reference both are within the kernel tests' bf16 tolerance
of it. Timing: do_bench medians (L2 flushed before each call), decode as CUDA-graph replays (device
time, as the runner replays decode steps) and prefill eagerly, interleaved old, new, old, new, ... for
--rounds rounds so that clock and thermal drift reach both alike. The table gives old ms, new ms,
new/old (ratio of the medians) and the range of the per-round ratios, which shows the noise.
Exit status 1 when an output check fails; timings decide nothing here, the reader judges them.
Sized to finish in about a minute on an H200, most of it compiling both kernels' variants.
"""

import argparse
import dataclasses
import importlib.util
import math
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

from kernels.bench.kernels import (
    BLOCK_SIZE,
    DECODE_BATCHES,
    DECODE_CONTEXTS,
    DTYPE,
    HEAD_DIM,
    NUM_HEADS,
    NUM_KV_HEADS,
    PREFILL_SHAPES,
    GiB,
    rel_err,
)

REF_TOL = 2e-2  # relative Frobenius error for bf16, as tests/kernels/conftest.py's TOL
REF_MAX_SCORES = 2**25  # reference only where batch * seq_len * queries stays below this
REF_MAX_KEYS = 2**19  # ... and batch * seq_len (its per-sequence loop and fp32 K/V copies)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path, help="path of the old paged_attention.py")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved old/new timing rounds per cell")
    parser.add_argument("--rep-ms", type=float, default=50.0, help="do_bench measuring time per timing")
    parser.add_argument("--atol", type=float, default=0.0, help="largest allowed |old - new| of an output")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.rep_ms <= 0 or args.atol < 0:
        parser.error("--rounds >= 1, --rep-ms > 0 and --atol >= 0")
    return args


def load_old(path: Path) -> ModuleType:
    """The old file as module ``old_paged_attention`` (its kernel compiles apart from the new one)."""
    if not path.is_file():
        raise SystemExit(f"error: {path} is not a file")
    spec = importlib.util.spec_from_file_location("old_paged_attention", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise SystemExit(f"error: cannot load {path}: {type(e).__name__}: {e}") from None
    return module


def cells() -> list[tuple[str, int, int, int]]:
    """(kind, batch, seq_len, queries per sequence) of kernels/bench/kernels.py's decode and prefill tables."""
    decode = [("decode", b, ctx, 1) for b in DECODE_BATCHES for ctx in DECODE_CONTEXTS]
    return decode + [("prefill", b, seq_len, seq_len) for b, seq_len in PREFILL_SHAPES]


def make_inputs(batch: int, seq_len: int, num_queries: int, gen: torch.Generator, device: torch.device) -> tuple:
    """Paged inputs with shuffled block tables: (q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)."""
    num_blocks = batch * seq_len // BLOCK_SIZE
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, device=device, dtype=DTYPE)
    v_cache = torch.randn(shape, device=device, dtype=DTYPE)
    block_tables = torch.randperm(num_blocks, generator=gen).to(torch.int32).view(batch, -1).to(device)
    q = torch.randn((batch * num_queries, NUM_HEADS, HEAD_DIM), device=device, dtype=DTYPE)
    seq_lens = torch.full((batch,), seq_len, dtype=torch.int32, device=device)
    query_start_loc = torch.arange(0, batch * num_queries + 1, num_queries, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, block_tables, seq_lens, query_start_loc


def config_of(module: ModuleType, batch: int, seq_len: int, num_queries: int, num_sms: int) -> dict:
    cfg = module.choose_config(batch * num_queries, batch, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, DTYPE,
                               num_queries, seq_len, num_sms)
    return dataclasses.asdict(cfg)


def timer(fn, graph: bool):
    """What do_bench calls: ``fn`` itself, or the replay of a CUDA graph of it (captured after a warm
    call on a side stream, as torch requires)."""
    if not graph:
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def time_interleaved(old_fn, new_fn, rounds: int, rep_ms: float) -> tuple[list[float], list[float]]:
    import triton.testing

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median")

    old_ms, new_ms = [], []
    for _ in range(rounds):
        old_ms.append(bench(old_fn))
        new_ms.append(bench(new_fn))
    return old_ms, new_ms


def check_cell(old: ModuleType, new: ModuleType, kind: str, batch: int, seq_len: int, num_queries: int,
               args: argparse.Namespace, gen: torch.Generator, device: torch.device) -> dict:
    """One table row: config, output checks and interleaved timings of one cell."""
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    cfg = config_of(new, batch, seq_len, num_queries, num_sms)
    row = {"cell": f"{kind} {batch} x {seq_len}", "config": cfg, "failures": []}
    if config_of(old, batch, seq_len, num_queries, num_sms) != cfg:
        row["failures"].append("old and new choose different configs")
    inputs = make_inputs(batch, seq_len, num_queries, gen, device)
    call_args = (*inputs, HEAD_DIM**-0.5, None, num_queries, seq_len)
    outs = {}
    for name, module in (("old", old), ("new", new)):
        outs[name] = module.paged_attention_triton(*call_args)  # compiles the variant
        if not torch.isfinite(outs[name]).all():
            row["failures"].append(f"{name} output not finite")
    row["max_abs_diff"] = (outs["old"].float() - outs["new"].float()).abs().max().item()
    if not row["max_abs_diff"] <= args.atol:
        row["failures"].append(f"max |old - new| {row['max_abs_diff']:.3g} > {args.atol:g}")
    if batch * seq_len * num_queries <= REF_MAX_SCORES and batch * seq_len <= REF_MAX_KEYS:
        ref = new.paged_attention_ref(*inputs, HEAD_DIM**-0.5)
        row["ref_err"] = {name: rel_err(out, ref) for name, out in outs.items()}
        row["failures"] += [f"{name} off the reference: {err:.3g}" for name, err in row["ref_err"].items()
                            if not err <= REF_TOL]
        ref = None
    outs = None
    graph = kind == "decode" and device.type == "cuda"
    old_fn = timer(lambda: old.paged_attention_triton(*call_args), graph)
    new_fn = timer(lambda: new.paged_attention_triton(*call_args), graph)
    row["timer"] = "graph" if graph else "eager"
    row["old_ms"], row["new_ms"] = time_interleaved(old_fn, new_fn, args.rounds, args.rep_ms)
    return row


def describe(cfg: dict) -> str:
    splits = f", {cfg['num_splits']} splits" if cfg["num_splits"] > 1 else ""
    return f"m {cfg['block_m']} tile {cfg['tile_n']} w{cfg['num_warps']} s{cfg['num_stages']}{splits}"


def print_row(row: dict) -> None:
    if "skipped" in row:
        print(f"{row['cell']:22s} skipped: {row['skipped']}", flush=True)
        return
    old_ms, new_ms = statistics.median(row["old_ms"]), statistics.median(row["new_ms"])
    ratios = [n / o for o, n in zip(row["old_ms"], row["new_ms"], strict=True)]
    ref = "{old:.1e}/{new:.1e}".format(**row["ref_err"]) if "ref_err" in row else "-"
    status = "ok" if not row["failures"] else "FAIL: " + "; ".join(row["failures"])
    print(f"{row['cell']:22s} {describe(row['config']):30s} {row['timer']:5s} {row['max_abs_diff']:9.3g} "
          f"{ref:>15s} {old_ms:9.4f} {new_ms:9.4f} {new_ms / old_ms:7.3f}  {min(ratios):.3f}-{max(ratios):.3f} "
          f"{row.get('seconds', 0):5.1f}s  {status}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: needs a CUDA GPU")
    old = load_old(args.old)
    new = importlib.import_module("kernels.paged_attention")  # the package exports the function

    start = time.perf_counter()
    print(f"old {args.old}, new {new.__file__}; {torch.cuda.get_device_name(0)}; {args.rounds} rounds")
    print(f"{'cell':22s} {'config':30s} {'timer':5s} {'|old-new|':>9s} {'ref err o/n':>15s} {'old ms':>9s} "
          f"{'new ms':>9s} {'new/old':>7s}  round ratios  time")
    rows, gen = [], torch.Generator().manual_seed(0)
    for kind, batch, seq_len, num_queries in cells():
        kv_bytes = 2 * batch * seq_len * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
        free = torch.cuda.mem_get_info()[0]
        if kv_bytes + GiB > free:
            row = {"cell": f"{kind} {batch} x {seq_len}", "skipped": f"needs {kv_bytes / GiB:.1f} GiB of K/V, "
                   f"{free / GiB:.1f} GiB free"}
        else:
            cell_start = time.perf_counter()
            row = check_cell(old, new, kind, batch, seq_len, num_queries, args, gen, torch.device("cuda"))
            row["seconds"] = time.perf_counter() - cell_start  # mostly compiling both kernels' variant
        torch.cuda.empty_cache()
        rows.append(row)
        print_row(row)
    done = [r for r in rows if "skipped" not in r]
    for kind in ("decode", "prefill"):
        ratios = [statistics.median(r["new_ms"]) / statistics.median(r["old_ms"]) for r in done
                  if r["cell"].startswith(kind)]
        if ratios:
            geomean = math.exp(sum(map(math.log, ratios)) / len(ratios))
            print(f"{kind}: geometric mean new/old {geomean:.3f} over {len(ratios)} cells")
    failed = [r["cell"] for r in done if r["failures"]]
    print(f"{len(done)} cells checked, {len(rows) - len(done)} skipped, {len(failed)} failed"
          f"{': ' + ', '.join(failed) if failed else ''}; {time.perf_counter() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
