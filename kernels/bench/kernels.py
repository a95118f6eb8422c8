"""Kernel benchmarks on a CUDA GPU: ``python -m kernels.bench --out bench.json`` (kernels/bench/__main__.py runs this).

First the two ceilings of this device (device-to-device copy bandwidth, counting bytes read plus
written, and the bf16 matmul rate), then one table per kernel: median time over
``triton.testing.do_bench`` runs (L2 flushed before each), bandwidth as % of the measured copy
bandwidth, and for attention the time of ``torch.nn.functional.scaled_dot_product_attention`` on the
same data laid out contiguously. ``--sweep`` also times alternative launch configs of paged attention.
"""

import argparse
import dataclasses
import json
import time
import traceback

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import apply_rotary, copy_blocks, paged_attention, rms_norm, silu_and_mul, store_kv
from kernels._triton import cdiv, sm_count
from kernels.activation import silu_and_mul_ref
from kernels.bench.ceilings import measure_ceilings
from kernels.copy_blocks import copy_blocks_ref
from kernels.paged_attention import AttentionConfig, choose_config, paged_attention_triton
from kernels.rms_norm import rms_norm_ref
from kernels.rotary import apply_rotary_ref
from kernels.store_kv import store_kv_ref

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE = 32, 8, 128, 16, torch.bfloat16
DECODE_BATCHES, DECODE_CONTEXTS = (1, 8, 64, 256), (512, 4096, 32768)
PREFILL_SHAPES = ((8, 2048), (1, 16384))  # (sequences, tokens each)
GiB = 1 << 30


def bench(fn) -> float:
    """Median milliseconds."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")


def bench_graph(fn) -> float:
    """Median milliseconds of ``fn`` captured in a CUDA graph (as the runner replays decode steps): the
    device time without Python launch overhead. do_bench still flushes L2 before every replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay)


def cpu_us(fn, n: int = 50) -> float:
    """Host microseconds per call (launch overhead), GPU work left to run behind it."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def paged_from_contiguous(k_seq: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """k_seq [B, L, H, D] -> (cache [B * L / BLOCK_SIZE, BLOCK_SIZE, H, D], block_tables [B, L / BLOCK_SIZE])
    with the blocks in random order."""
    batch, seq_len, heads, dim = k_seq.shape
    num_blocks = batch * seq_len // BLOCK_SIZE
    perm = torch.randperm(num_blocks, generator=gen, device="cpu").cuda()
    cache = torch.empty((num_blocks, BLOCK_SIZE, heads, dim), dtype=k_seq.dtype, device="cuda")
    cache[perm] = k_seq.view(num_blocks, BLOCK_SIZE, heads, dim)
    return cache, perm.view(batch, seq_len // BLOCK_SIZE).to(torch.int32)


def make_cell(batch: int, seq_len: int, num_queries: int, gen: torch.Generator) -> dict:
    """Random q/K/V for ``batch`` sequences of ``seq_len`` tokens whose last ``num_queries`` are queries,
    in both layouts: contiguous per sequence (SDPA) and paged through shuffled block tables."""
    kw = dict(device="cuda", dtype=DTYPE)
    k_seq = torch.randn((batch, seq_len, NUM_KV_HEADS, HEAD_DIM), **kw)
    v_seq = torch.randn((batch, seq_len, NUM_KV_HEADS, HEAD_DIM), **kw)
    q = torch.randn((batch * num_queries, NUM_HEADS, HEAD_DIM), **kw)
    k_cache, block_tables = paged_from_contiguous(k_seq, gen)
    v_cache = torch.empty_like(k_cache)
    v_cache[block_tables.view(-1).long()] = v_seq.view(-1, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    return dict(
        q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, k_seq=k_seq, v_seq=v_seq,
        seq_lens=torch.full((batch,), seq_len, dtype=torch.int32, device="cuda"),
        query_start_loc=torch.arange(0, batch * num_queries + 1, num_queries, dtype=torch.int32, device="cuda"),
        batch=batch, seq_len=seq_len, num_queries=num_queries,
    )


def ours(cell: dict, config: AttentionConfig | None = None):
    args = (cell["q"], cell["k_cache"], cell["v_cache"], cell["block_tables"], cell["seq_lens"],
            cell["query_start_loc"], HEAD_DIM**-0.5, None, cell["num_queries"], cell["seq_len"])
    if config is None:
        return lambda: paged_attention(*args)
    return lambda: paged_attention_triton(*args, config=config)


def sdpa(cell: dict, backend: SDPBackend | None):
    """SDPA over [B, H, L, D] views of the contiguous [B, L, H, D] tensors (flash's native layout)."""
    b, nq = cell["batch"], cell["num_queries"]
    q = cell["q"].view(b, nq, NUM_HEADS, HEAD_DIM).transpose(1, 2)
    k, v = cell["k_seq"].transpose(1, 2), cell["v_seq"].transpose(1, 2)
    causal = nq > 1  # prefill cells are whole sequences; a decode query sees every key

    def run():
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    return run, lambda out: out.transpose(1, 2).reshape(b * nq, NUM_HEADS, HEAD_DIM)


def time_sdpa(cell: dict, backends: dict, graph: bool = False) -> dict:
    """Median ms per SDPA backend that accepts the call, and the error of ours against the first."""
    times, ref = {}, None
    for name, backend in backends.items():
        run, to_tokens = sdpa(cell, backend)
        try:
            out = run()
        except RuntimeError as e:
            times[name] = f"unavailable: {str(e).splitlines()[0][:80]}"
            continue
        ref = to_tokens(out) if ref is None else ref
        times[name] = bench(run)
        if graph:
            times[name + "_graph"] = bench_graph(run)
            times[name + "_cpu_us"] = cpu_us(run)
    return {"times": times, "ref": ref}


def bench_decode(ceil: dict) -> list[dict]:
    rows, gen = [], torch.Generator().manual_seed(0)
    for batch in DECODE_BATCHES:
        for ctx in DECODE_CONTEXTS:
            kv_bytes = 2 * batch * ctx * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
            row = {"batch": batch, "context": ctx, "kv_bytes": kv_bytes}
            free = torch.cuda.mem_get_info()[0]
            if 2 * kv_bytes + GiB > free:  # paged and contiguous copies, plus slack
                row["skipped"] = f"needs {2 * kv_bytes / GiB:.1f} GiB, {free / GiB:.1f} GiB free"
                rows.append(row)
                continue
            try:
                cell = make_cell(batch, ctx, 1, gen)
                fn = ours(cell)
                out = fn()
                ms = bench(fn)
                graph_ms, host_us = bench_graph(fn), cpu_us(fn)
                sd = time_sdpa(cell, {"default": None, "flash": SDPBackend.FLASH_ATTENTION}, graph=True)
                ok = {k: v for k, v in sd["times"].items() if k in ("default", "flash") and isinstance(v, float)}
                best = min(ok, key=ok.get)
                best_graph = sd["times"][best + "_graph"]
                row.update(
                    ms=ms, gbps=(kv_bytes + 2 * out.numel() * 2) / ms / 1e6, sdpa=sd["times"], sdpa_best=best,
                    vs_sdpa=ms / ok[best], graph_ms=graph_ms, cpu_us=host_us, sdpa_graph_ms=best_graph,
                    vs_sdpa_graph=graph_ms / best_graph, err_vs_sdpa=rel_err(out, sd["ref"]),
                    config=dataclasses.asdict(choose_config(batch, batch, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM,
                                                            DTYPE, 1, ctx, sm_count(out))),
                )
                row["pct_copy_bw"] = 100 * row["gbps"] / ceil["copy_gbps"]
                row["pct_copy_bw_graph"] = 100 * kv_bytes / graph_ms / 1e6 / ceil["copy_gbps"]
            except torch.OutOfMemoryError as e:
                row["skipped"] = f"out of memory: {str(e).splitlines()[0][:80]}"
            finally:
                cell = fn = out = sd = None
                torch.cuda.empty_cache()
            rows.append(row)
            print_row("decode", row)
    return rows


def bench_prefill(ceil: dict) -> list[dict]:
    rows, gen = [], torch.Generator().manual_seed(1)
    for batch, seq_len in PREFILL_SHAPES:
        cell = make_cell(batch, seq_len, seq_len, gen)
        fn = ours(cell)
        out = fn()
        ms = bench(fn)
        sd = time_sdpa(cell, {"flash": SDPBackend.FLASH_ATTENTION})
        flops = 4 * batch * NUM_HEADS * HEAD_DIM * seq_len * (seq_len + 1) / 2  # causal half of QK^T and PV
        row = {"batch": batch, "seq_len": seq_len, "ms": ms, "tflops": flops / ms / 1e9, "sdpa": sd["times"],
               "err_vs_sdpa": rel_err(out, sd["ref"]) if sd["ref"] is not None else None}
        if isinstance(sd["times"].get("flash"), float):
            row["vs_sdpa"] = ms / sd["times"]["flash"]
            row["sdpa_tflops"] = flops / sd["times"]["flash"] / 1e9
        row["pct_matmul"] = 100 * row["tflops"] / ceil["matmul_tflops"]
        rows.append(row)
        print_row("prefill", row)
        cell = fn = out = sd = None
        torch.cuda.empty_cache()
    return rows


def bench_small(ceil: dict) -> list[dict]:
    """The memory-bound helpers at one serving-sized shape each; bytes are the minimum each must move."""
    kw = dict(device="cuda", dtype=DTYPE)
    tokens, hidden, inter = 8192, 4096, 14336
    rows = []

    def add(name, shape, fn, ref_fn, nbytes):
        fn()
        ms, ref_ms = bench(fn), bench(ref_fn)
        row = {"kernel": name, "shape": shape, "ms": ms, "torch_ms": ref_ms, "gbps": nbytes / ms / 1e6}
        row["pct_copy_bw"] = 100 * row["gbps"] / ceil["copy_gbps"]
        rows.append(row)
        print_row("small", row)

    # store_kv: a prefill of 8192 tokens scattered to shuffled slots.
    k = torch.randn((tokens, NUM_KV_HEADS, HEAD_DIM), **kw)
    v = torch.randn_like(k)
    num_blocks = 2 * tokens // BLOCK_SIZE
    k_cache = torch.empty((num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM), **kw)
    v_cache = torch.empty_like(k_cache)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device="cuda")[:tokens]
    add("store_kv", f"{tokens} tok x {NUM_KV_HEADS}x{HEAD_DIM}, bs {BLOCK_SIZE}",
        lambda: store_kv(k, v, k_cache, v_cache, slots), lambda: store_kv_ref(k, v, k_cache, v_cache, slots),
        4 * k.numel() * k.element_size())
    # copy_blocks: 256 copy-on-write pairs in each of 32 layers, one launch.
    layers, pairs = 32, 256
    caches = [(torch.empty((2048, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM), **kw),
               torch.empty((2048, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM), **kw)) for _ in range(layers)]
    ids = torch.randperm(2048, device="cuda")
    src, dst = ids[:pairs], ids[pairs:2 * pairs]
    block_bytes = BLOCK_SIZE * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
    add("copy_blocks", f"{layers} layers x {pairs} blocks", lambda: copy_blocks(caches, src, dst),
        lambda: copy_blocks_ref(caches, src, dst), 2 * 2 * layers * pairs * block_bytes)
    caches = None
    # rms_norm with the residual add.
    x = torch.randn((tokens, hidden), **kw)
    res = torch.randn_like(x)
    w = torch.randn(hidden, **kw)
    add("rms_norm+residual", f"{tokens} x {hidden}", lambda: rms_norm(x, w, 1e-6, res),
        lambda: rms_norm_ref(x, w, 1e-6, res), 4 * x.numel() * 2)
    # rotary, in place on q and k.
    q = torch.randn((tokens, NUM_HEADS, HEAD_DIM), **kw)
    kk = torch.randn((tokens, NUM_KV_HEADS, HEAD_DIM), **kw)
    pos = torch.randint(0, 8192, (tokens,), device="cuda")
    cos_sin = torch.randn((8192, HEAD_DIM), device="cuda")
    add("rotary (neox)", f"{tokens} tok, {NUM_HEADS}+{NUM_KV_HEADS} heads x {HEAD_DIM}",
        lambda: apply_rotary(pos, q, kk, cos_sin), lambda: apply_rotary_ref(pos, q, kk, cos_sin),
        2 * (q.numel() + kk.numel()) * 2 + tokens * HEAD_DIM * 4)
    # silu_and_mul.
    xx = torch.randn((tokens, 2 * inter), **kw)
    add("silu_and_mul", f"{tokens} x 2*{inter}", lambda: silu_and_mul(xx), lambda: silu_and_mul_ref(xx),
        3 * tokens * inter * 2)
    return rows


def sweep(ceil: dict) -> list[dict]:
    """Decode launch configs around the chosen one (tile, stages, splits), CUDA-graph timed."""
    rows, gen = [], torch.Generator().manual_seed(2)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    decode_cells = [(1, 512), (1, 4096), (1, 32768), (8, 512), (8, 4096), (64, 512), (256, 512), (8, 32768)]
    for batch, ctx in decode_cells:
        cell = make_cell(batch, ctx, 1, gen)
        base = choose_config(batch, batch, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, DTYPE, 1, ctx, sms)
        kv_bytes = 2 * batch * ctx * NUM_KV_HEADS * HEAD_DIM * 2
        configs = [base]
        for tile_n, stages in ((128, 5), (128, 2), (64, 5), (32, 7)):
            for factor in (0.5, 1, 2, 4):  # splits around the chosen count
                splits = max(1, min(ctx // tile_n, round(base.num_splits * factor)))
                split_len = cdiv(cdiv(ctx, splits), tile_n) * tile_n
                configs.append(dataclasses.replace(base, tile_n=tile_n, num_stages=stages,
                                                   num_splits=cdiv(ctx, split_len), split_len=split_len))
        for cfg in dict.fromkeys(configs):
            rows.append(sweep_one("decode", batch, ctx, cell, cfg, kv_bytes, ceil))
        cell = None
        torch.cuda.empty_cache()
    return rows


def sweep_prefill(ceil: dict) -> list[dict]:
    """Alternative prefill tile shapes."""
    rows, gen = [], torch.Generator().manual_seed(4)
    for batch, seq_len in PREFILL_SHAPES:
        cell = make_cell(batch, seq_len, seq_len, gen)
        flops = 4 * batch * NUM_HEADS * HEAD_DIM * seq_len * (seq_len + 1) / 2
        for block_m, tile_n, warps, stages in ((128, 128, 8, 3), (128, 32, 4, 3), (128, 128, 8, 4), (128, 64, 8, 3),
                                               (256, 64, 8, 2), (64, 64, 4, 3)):
            cfg = AttentionConfig(block_q=block_m // (NUM_HEADS // NUM_KV_HEADS), block_m=block_m, tile_n=tile_n,
                                  num_splits=1, split_len=cdiv(seq_len, tile_n) * tile_n, num_warps=warps,
                                  num_stages=stages)
            rows.append(sweep_one("prefill", batch, seq_len, cell, cfg, flops, ceil))
        cell = None
        torch.cuda.empty_cache()
    return rows


def host_profile(ceil: dict) -> str:
    """cProfile of eager decode calls (batch 8 x 512, split and unsplit): where the host time goes."""
    import cProfile
    import io
    import pstats

    cell = make_cell(8, 512, 1, torch.Generator().manual_seed(3))
    out = io.StringIO()
    for splits in (1, 4):
        cfg = dataclasses.replace(choose_config(8, 8, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, DTYPE, 1, 512, 132),
                                  num_splits=splits, split_len=512 // splits)
        for fn in (ours(cell, cfg), ours(cell)):
            fn()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(200):
                fn()
            prof.disable()
            torch.cuda.synchronize()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(14)
    print(out.getvalue()[-6000:])
    return out.getvalue()


def sweep_one(kind, batch, ctx, cell, cfg, work, ceil) -> dict:
    row = {"kind": kind, "batch": batch, "context": ctx, "config": dataclasses.asdict(cfg)}
    try:
        fn = ours(cell, cfg)
        fn()
        row["ms"] = bench_graph(fn) if kind == "decode" else bench(fn)
        if kind == "decode":
            row["pct_copy_bw"] = 100 * work / row["ms"] / 1e6 / ceil["copy_gbps"]
        else:
            row["tflops"] = work / row["ms"] / 1e9
    except Exception as e:  # out of resources for one config should not end the sweep
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    print(f"sweep {kind} {batch}x{ctx} {cfg.tile_n=} {cfg.num_warps=} {cfg.num_stages=} "
          f"{cfg.num_splits=} {cfg.block_m=}: {row.get('ms', row.get('error'))}", flush=True)
    return row


def compiled_resources() -> list[dict]:
    """Registers, spills and shared memory of every kernel variant compiled in this process."""
    import importlib

    rows = []
    for name in ("paged_attention", "store_kv", "copy_blocks", "rms_norm", "rotary", "activation"):
        mod = importlib.import_module(f"kernels.{name}")  # the package's attributes are the functions
        for name, obj in vars(mod).items():
            jit_fn = getattr(obj, "_kernel", None)
            if jit_fn is None or not hasattr(jit_fn, "device_caches"):
                continue
            for cache in jit_fn.device_caches.values():
                for key, k in cache[0].items():
                    k._init_handles()
                    rows.append({"kernel": name, "key": str(key)[-300:], "regs": k.n_regs, "spills": k.n_spills,
                                 "shared": k.metadata.shared, "warps": k.metadata.num_warps,
                                 "stages": k.metadata.num_stages})
    return rows


def print_row(kind: str, row: dict) -> None:
    print(kind, json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                            if k != "config"}), flush=True)


def fmt_ms(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "n/a"


def tables(result: dict) -> str:
    ceil = result["ceilings"]
    lines = [f"Device: {result['device']} ({result['sms']} SMs); measured copy bandwidth "
             f"{ceil['copy_gbps']:.0f} GB/s (read + write), bf16 matmul {ceil['matmul_tflops']:.0f} TFLOP/s.",
             "", "Decode (bf16, 32 q / 8 kv heads, head dim 128, block size 16, shuffled blocks):", "",
             "Eager: do_bench of the Python call. Graph: do_bench of a CUDA-graph replay of the same call (as",
             "the runner replays decode steps), i.e. device time without host launch overhead. L2 is flushed",
             "before every run in both. Ratio = paged_attention / SDPA.", "",
             "| batch | context | eager ms | % copy BW | SDPA eager ms | ratio | graph ms | % copy BW | "
             "SDPA graph ms | ratio | host us/call (ours, SDPA) | splits |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["decode"]:
        if "skipped" in r:
            lines.append(f"| {r['batch']} | {r['context']} | skipped: {r['skipped']} |" + " |" * 9)
            continue
        sd, best = r["sdpa"], r["sdpa_best"]
        lines.append(f"| {r['batch']} | {r['context']} | {r['ms']:.4f} | {r['pct_copy_bw']:.1f} | "
                     f"{sd[best]:.4f} ({best}) | {r['vs_sdpa']:.2f} | {r['graph_ms']:.4f} | "
                     f"{r['pct_copy_bw_graph']:.1f} | {r['sdpa_graph_ms']:.4f} | {r['vs_sdpa_graph']:.2f} | "
                     f"{r['cpu_us']:.0f}, {sd[best + '_cpu_us']:.0f} | {r['config']['num_splits']} |")
    lines += ["", "Prefill (causal, same config):", "",
              "| seqs x tokens | paged_attention ms | TFLOP/s | SDPA flash ms | SDPA TFLOP/s | ratio |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in result["prefill"]:
        lines.append(f"| {r['batch']} x {r['seq_len']} | {r['ms']:.3f} | {r['tflops']:.0f} | "
                     f"{fmt_ms(r['sdpa'].get('flash'))} | {r.get('sdpa_tflops', 0):.0f} | "
                     f"{r.get('vs_sdpa', float('nan')):.2f} |")
    lines += ["", "Memory-bound kernels (bf16):", "",
              "| kernel | shape | ms | GB/s | % copy BW | torch reference ms |", "|---|---|---:|---:|---:|---:|"]
    for r in result["small"]:
        lines.append(f"| {r['kernel']} | {r['shape']} | {r['ms']:.4f} | {r['gbps']:.0f} | {r['pct_copy_bw']:.1f} | "
                     f"{r['torch_ms']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON results path")
    parser.add_argument("--sweep", action="store_true", help="also time alternative decode configs")
    parser.add_argument("--sweep-prefill", action="store_true", help="also time alternative prefill tiles")
    parser.add_argument("--skip-tables", action="store_true", help="ceilings and sweep only")
    parser.add_argument("--host-profile", action="store_true", help="profile the host side of a decode call")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernels.bench needs a CUDA GPU")
    t0 = time.time()
    props = torch.cuda.get_device_properties(0)
    result = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__}
    import triton

    result["triton"] = triton.__version__
    result["ceilings"] = ceil = measure_ceilings("cuda")
    print("ceilings", json.dumps(ceil), flush=True)
    sections = [] if args.skip_tables else [("decode", bench_decode), ("prefill", bench_prefill),
                                            ("small", bench_small)]
    if args.sweep:
        sections.append(("sweep", sweep))
    if args.sweep_prefill:
        sections.append(("sweep_prefill", sweep_prefill))
    if args.host_profile:
        sections.append(("host_profile", host_profile))
    for name, fn in sections:
        try:  # one broken section should not cost the others
            result[name] = fn(ceil)
        except Exception:
            result[name] = []
            result.setdefault("errors", {})[name] = traceback.format_exc()
            print(f"section {name} failed:\n{result['errors'][name]}", flush=True)
        torch.cuda.empty_cache()
    try:
        result["compiled"] = compiled_resources()
    except Exception:
        result["compiled"] = traceback.format_exc()
    result["seconds"] = time.time() - t0
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    if not args.skip_tables:
        print()
        print(tables(result))
    print(f"\n{result['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
