"""Launch configs of paged attention: query rows, key tiles, warps, stages and the split-KV policy,
picked from shapes and host-side hints (no device data, so a call can be captured in a CUDA graph).
The measurements behind each choice are in kernels/NOTES.md."""

import functools
from dataclasses import dataclass

import torch

from kernels._triton import cdiv, next_power_of_2


@dataclass(frozen=True, slots=True)
class AttentionConfig:
    """Launch shape of one paged-attention call; ``choose_config`` picks it from shapes and hints."""

    block_q: int  # queries of one sequence per program
    block_m: int  # rows per program: block_q * group, padded to a power of 2 >= 16 (tl.dot minimum)
    tile_n: int  # keys per inner-loop step
    num_splits: int  # programs along the key axis; > 1: partials merged by the last split
    split_len: int  # keys per split, a multiple of tile_n; the last split also takes the rest
    num_warps: int
    num_stages: int


# Split-KV (tuned on H100, kernels/NOTES.md): programs of a long context split in pieces of at least
# LONG_SPLIT_LEN keys; fewer programs than SMs are latency-bound and split into single-wave pieces.
LONG_SPLIT_LEN = 2048
MAX_SPLITS = 128


@functools.lru_cache(maxsize=1024)
def choose_config(
    num_tokens: int,
    num_seqs: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    max_query_len: int,
    max_seq_len: int,
    num_sms: int,
) -> AttentionConfig:
    group = num_heads // num_kv_heads
    head_dim_pad = next_power_of_2(head_dim)
    wide = head_dim_pad > 128 or dtype == torch.float32  # halve the tiles to stay within shared memory
    max_rows = 64 if wide else 128
    block_q = max(1, min(next_power_of_2(max(max_query_len, 1)), max_rows // group))
    block_m = max(16, next_power_of_2(block_q * group))
    num_programs = num_kv_heads * count_query_blocks(num_tokens, num_seqs, block_q)
    seq_len = max(max_seq_len, 1)
    # Few programs: split to about one program per SM (one wave of the 140 KB-shared-memory tile-128
    # programs). Long contexts: split further, up to 4 per SM, for balance.
    few = max(1, min(num_sms // num_programs, seq_len // 128))
    long = min(cdiv(4 * num_sms, num_programs), seq_len // LONG_SPLIT_LEN)
    if block_m <= 16:  # decode: bandwidth- or latency-bound
        # 5 stages keep two K/V tiles in flight behind the block-table loads (3 stages keep one, and
        # every tile then waits a full memory latency); 7 stages keep three.
        num_warps = 4
        if wide:
            tile_n, num_stages = 32, 5
        elif num_programs < num_sms and few >= long:
            tile_n, num_stages = 128, 5
        elif seq_len <= 1024:  # short contexts, many programs: wide tiles (NOTES v9: 3-4% over tile 32)
            tile_n, num_stages = 128, 2
        else:
            tile_n, num_stages = 64, 5
    elif block_m <= 64:
        tile_n, num_warps, num_stages = (32 if wide else 64), 4, 2
    elif seq_len <= 2048:  # prefill of short sequences: narrow key tiles waste less at the diagonal (NOTES v9)
        tile_n, num_warps, num_stages = 32, 4, 3
    else:  # prefill of long sequences: matrix-bound
        tile_n, num_warps, num_stages = 128, 8, 3
    if wide and head_dim_pad > 128 and dtype == torch.float32:
        num_stages = 1

    num_splits = max(1, min(MAX_SPLITS, max(few, long) if num_programs < num_sms else long))
    split_len = cdiv(cdiv(seq_len, num_splits), tile_n) * tile_n
    num_splits = cdiv(seq_len, split_len)
    return AttentionConfig(block_q, block_m, tile_n, num_splits, split_len, num_warps, num_stages)


def count_query_blocks(num_tokens: int, num_seqs: int, block_q: int) -> int:
    # Query block b of sequence s has index first(s) + b, first(s) = query_start_loc[s] // block_q + s:
    # an upper bound of the real count that needs no device data (programs past a sequence's end exit).
    # With block_q == 1 the blocks are the tokens themselves.
    return num_tokens if block_q == 1 else num_tokens // block_q + num_seqs


# Split-KV tickets, per device: one int32 per (query block, KV head) program column, zero between
# launches (each launch's merging program resets its own). Calls on one device must not overlap in
# time on different streams.
_counters: dict[torch.device, torch.Tensor] = {}


def split_counters(device: torch.device, n: int) -> torch.Tensor:
    counters = _counters.get(device)
    if counters is None or counters.numel() < n:
        counters = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
        _counters[device] = counters
    return counters
