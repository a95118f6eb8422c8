"""kernels/NOTES.md v9: paged-attention launch configs at the shapes W8B steps run: decode of 64-256
sequences x 512-1024 keys (graph replay, against SDPA) and causal prefill of short sequences
(do_bench, TFLOP/s, against SDPA flash)."""

import torch
from torch.nn.attention import SDPBackend

from kernels.bench.kernels import HEAD_DIM, NUM_HEADS, bench, bench_graph, make_cell, ours, sdpa
from kernels.paged_attention import AttentionConfig

DECODE = ((64, 512), (256, 512), (256, 640), (256, 768), (256, 1024), (128, 1024))
DECODE_CONFIGS = ((32, 4, 7), (128, 4, 3), (128, 4, 2), (64, 4, 5), (64, 4, 3), (128, 8, 3))  # tile, warps, stages
PREFILL = ((16, 512), (8, 1024), (32, 256), (8, 2048), (1, 16384))
PREFILL_CONFIGS = ((128, 32, 4, 3), (128, 32, 4, 4), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3),
                   (64, 32, 4, 3), (128, 32, 8, 3))  # block_m, tile, warps, stages


def timed(cell: dict, cfg: AttentionConfig, graph: bool, scale: float) -> str:
    """scale / milliseconds of one config (graph replay or do_bench), or the error's name."""
    try:
        return f"{scale / (bench_graph if graph else bench)(ours(cell, cfg)):.1f}"
    except Exception as e:  # a config out of resources should not end the sweep
        return type(e).__name__


def main() -> None:
    gen = torch.Generator().manual_seed(5)
    for batch, ctx in DECODE:
        cell = make_cell(batch, ctx, 1, gen)
        kv = 2 * batch * ctx * 8 * 128 * 2
        run, _ = sdpa(cell, None)
        s, d = bench_graph(run), bench_graph(ours(cell))
        res = []
        for tn, w, st in DECODE_CONFIGS:
            cfg = AttentionConfig(block_q=1, block_m=16, tile_n=tn, num_splits=1, split_len=-(-ctx // tn) * tn,
                                  num_warps=w, num_stages=st)
            res.append(f"tn{tn}/w{w}/st{st}=" + timed(cell, cfg, True, 1e3))
        print(f"decode {batch}x{ctx}: sdpa {s * 1e3:.1f} default {d * 1e3:.1f} ({kv / d / 1e6:.0f} GB/s) | "
              + " ".join(res), flush=True)
        cell = None
        torch.cuda.empty_cache()
    for batch, length in PREFILL:
        cell = make_cell(batch, length, length, gen)
        flops = 4 * batch * NUM_HEADS * HEAD_DIM * length * (length + 1) / 2
        run, _ = sdpa(cell, SDPBackend.FLASH_ATTENTION)
        s, d = bench(run), bench(ours(cell))
        res = []
        for bm, tn, w, st in PREFILL_CONFIGS:
            cfg = AttentionConfig(block_q=bm // 4, block_m=bm, tile_n=tn, num_splits=1,
                                  split_len=-(-length // tn) * tn, num_warps=w, num_stages=st)
            res.append(f"bm{bm}/tn{tn}/w{w}/st{st}=" + timed(cell, cfg, False, flops / 1e9))
        print(f"prefill {batch}x{length} TF/s: sdpa {flops / s / 1e9:.0f} default {flops / d / 1e9:.0f} | "
              + " ".join(res), flush=True)
        cell = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
