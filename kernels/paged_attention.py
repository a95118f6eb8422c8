"""Paged attention over a varlen batch that mixes prefill chunks and decode tokens.

Sequence s owns queries ``q[query_start_loc[s]:query_start_loc[s+1]]``; they are its last tokens, so
query i of a sequence with n queries and context length L sits at position L - n + i and attends
causally to keys 0..L-n+i, read through the sequence's block table.

Kernel layout. One launch covers the whole batch. A program owns one (query block, KV head, split):
a query block is up to ``block_q`` consecutive queries of one sequence, and its rows are those
queries times the ``group`` query heads that share the KV head (GQA packing), so every K/V tile is
loaded once for all of them. Programs find their sequence in the kernel (decode: program = token,
checked; otherwise a count over ``query_start_loc``), so the grid depends only on shapes and host
hints: no device-to-host sync, and the call can be captured in a CUDA graph. Keys are walked in three
phases so that only the tiles at the sliding-window edge and at the causal diagonal pay for masks.
When there are too few programs for the GPU (small decode batches, long contexts) the key axis is
split (split-KV): each split writes a partial output and its log-sum-exp to scratch, and the last
split of each (query block, KV head) to finish, found with an atomic ticket, merges them in the same
launch. Launch configs (tiles, stages, splits) come from kernels/attention_config.py.

An fp8 (e4m3) cache is dequantized in the kernel: each K/V tile is converted to the query's dtype as it
is loaded, K's scale folded into the softmax scale and V's into the output (one byte per element read).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kernels._triton import jit, jit_helper, next_power_of_2, sm_count, use_triton
from kernels.attention_config import AttentionConfig, choose_config, count_query_blocks, split_counters
from kernels.paged_attention_cpu import paged_attention_sdpa

if TYPE_CHECKING:
    import triton.language as tl

_LOG2E = 1.4426950408889634


def paged_attention_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, context length including this step's tokens
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    scale: float,
    sliding_window: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Plain PyTorch: gather each sequence's K/V through its block table, then masked softmax in fp32.
    An fp8 cache holds K / k_scale and V / v_scale."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    if k_cache.dtype == torch.float8_e4m3fn:  # dequantize the whole cache (CPU float8 cannot be indexed)
        k_cache, v_cache = k_cache.float() * k_scale, v_cache.float() * v_scale
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for s, seq_len in enumerate(seq_lens.tolist()):
        q0, q1 = starts[s], starts[s + 1]
        num_q = q1 - q0
        if num_q == 0:
            continue
        blocks = block_tables[s, : (seq_len + block_size - 1) // block_size].long()
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
        k = k.repeat_interleave(group, dim=1).float()  # [seq_len, num_heads, head_dim]
        v = v.repeat_interleave(group, dim=1).float()
        scores = torch.einsum("qhd,khd->hqk", q[q0:q1].float(), k) * scale
        q_pos = torch.arange(seq_len - num_q, seq_len, device=q.device)[:, None]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        masked = k_pos > q_pos
        if sliding_window is not None:
            masked |= k_pos <= q_pos - sliding_window
        scores.masked_fill_(masked, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out


# The kernel and its helpers. Triton inlines every @jit_helper call before its first pass: the PTX
# is the one-function kernel's, instruction for instruction (NOTES v11; compile_check --dump shows it).
# Shapes: num_heads = NUM_KV_HEADS * GROUP; rows are the program's BLOCK_M packed (query, head) pairs.

@jit(do_not_specialize=("num_seqs", "num_tokens", "num_query_blocks", "split_len", "sliding_window"))
def _paged_attention_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    part_ptr,  # fp32 scratch: [num_splits, num_tokens, num_heads, head_dim] per-split normalized output,
    #            then [num_splits, num_tokens, num_heads] per-split log2-sum-exp2 of the scaled scores
    counters_ptr,  # [>= grid dim 0] int32, zero: split tickets
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens_ptr,  # [num_seqs] int32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    qk_scale,  # softmax scale * log2(e) (* k_scale for an fp8 cache): the softmax runs in base 2
    v_scale,  # fp8 cache: the output's factor; unused otherwise
    num_seqs, num_tokens, num_query_blocks, split_len,
    sliding_window,  # keys k with k > position - sliding_window are visible; unused unless SLIDING
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,  # power of 2 >= HEAD_DIM; the extra channels are masked
    BLOCK_SIZE: tl.constexpr,  # tokens per KV-cache block
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr,  # see AttentionConfig
    SEARCH: tl.constexpr,  # query_start_loc entries read per step of the sequence search
    SLIDING: tl.constexpr,
    SPLIT: tl.constexpr,  # num_splits > 1: write partials, the last split merges them
    MERGE_ROWS: tl.constexpr,  # power of 2 >= BLOCK_Q * GROUP
    MERGE_CHUNK: tl.constexpr,  # splits merged per step
    DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,  # the caches are float8_e4m3fn
):
    pid = tl.program_id(0)
    kv_head = pid % NUM_KV_HEADS
    # Latest query blocks first: under causal masking they see the most keys, so they should not
    # be the tail of the launch. Neighbouring programs are the KV heads of one block, which read
    # neighbouring bytes of the same cache blocks.
    q_block = num_query_blocks - 1 - pid // NUM_KV_HEADS
    split = tl.program_id(1)
    seq, q_start, num_q, seq_len, q_off = _locate_query_block(
        q_block, num_seqs, query_start_loc_ptr, seq_lens_ptr, BLOCK_Q, SEARCH)
    if q_off >= num_q:
        return

    row_ok, first_pos, last_pos, row_pos, token, head = _pack_rows(
        kv_head, q_start, num_q, seq_len, q_off, GROUP, BLOCK_Q, BLOCK_M)
    d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, HEAD_DIM_PAD]
    m_i, l_i, acc = _attend(
        q, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, kv_head, row_pos, first_pos, last_pos, d, d_ok,
        split, split_len, qk_scale, sliding_window, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
        stride_vh, stride_bt, BLOCK_SIZE, BLOCK_M, HEAD_DIM_PAD, TILE_N, SLIDING, SPLIT, DOT_PRECISION)
    if KV_FP8:
        acc = acc * v_scale  # V was stored divided by v_scale; the sum over keys is linear in V

    if SPLIT:
        part_lse_ptr = part_ptr + tl.num_programs(1).to(tl.int64) * num_tokens * (NUM_KV_HEADS * GROUP * HEAD_DIM)
        _store_partial(part_ptr, part_lse_ptr, m_i, l_i, acc, split, num_tokens, token, head, row_ok, d, d_ok,
                       NUM_KV_HEADS * GROUP, HEAD_DIM)
        # The last split of this (query block, KV head) to finish merges all of them, so the batch
        # needs one launch. The barrier orders every thread's partial stores before the one thread's
        # acq_rel ticket (release); the winner's acquire orders its reads (.cg: skip L1) after them.
        tl.debug_barrier()
        ticket = tl.atomic_add(counters_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if ticket == tl.num_programs(1) - 1:
            _merge_splits(out_ptr, part_ptr, part_lse_ptr, kv_head, q_start, num_q, q_off, num_tokens, d, d_ok,
                          stride_ot, stride_oh, NUM_KV_HEADS, GROUP, HEAD_DIM, HEAD_DIM_PAD, BLOCK_Q,
                          MERGE_ROWS, MERGE_CHUNK)
            tl.store(counters_ptr + pid, 0)  # zero again for the next launch
    else:
        o = acc / l_i[:, None]
        tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@jit_helper
def _locate_query_block(
    q_block,  # this program's query block, numbered as in count_query_blocks
    num_seqs,
    query_start_loc_ptr,  # [num_seqs + 1] int32
    seq_lens_ptr,  # [num_seqs] int32
    BLOCK_Q: tl.constexpr,
    SEARCH: tl.constexpr,
):
    """(seq, q_start, num_q, seq_len, q_off): the owning sequence, its first query token, query count,
    context length, and the block's first query within it; q_off >= num_q for blocks past its end."""
    # Decode batches (one query per sequence) need no search: the guess seq = q_block is checked by
    # loads that go out together with its seq_lens load.
    if BLOCK_Q == 1:
        seq = tl.minimum(q_block, num_seqs - 1)
        q_start = tl.load(query_start_loc_ptr + seq)
        q_end = tl.load(query_start_loc_ptr + seq + 1)
        seq_len = tl.load(seq_lens_ptr + seq)
        miss = (q_block < q_start) | (q_block >= q_end)
    else:  # placeholders: prefill blocks always search
        seq = q_block
        q_start = q_block
        q_end = q_block
        seq_len = q_block
        miss = q_block >= 0
    if miss:  # the owner is the last s with first_block(s) <= q_block
        count = 0
        for s0 in range(0, num_seqs, SEARCH):
            s = s0 + tl.arange(0, SEARCH)
            starts = tl.load(query_start_loc_ptr + s, mask=s < num_seqs, other=0)
            if BLOCK_Q == 1:
                first = starts
            else:
                first = starts // BLOCK_Q + s
            count += tl.sum(((first <= q_block) & (s < num_seqs)).to(tl.int32), axis=0)
        seq = count - 1
        q_start = tl.load(query_start_loc_ptr + seq)
        q_end = tl.load(query_start_loc_ptr + seq + 1)
        seq_len = tl.load(seq_lens_ptr + seq)
    num_q = q_end - q_start
    if BLOCK_Q == 1:
        q_off = q_block - q_start
    else:
        q_off = (q_block - q_start // BLOCK_Q - seq) * BLOCK_Q  # first query of the block, in the seq
    return seq, q_start, num_q, seq_len, q_off


@jit_helper
def _pack_rows(kv_head, q_start, num_q, seq_len, q_off,
               GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr):
    """GQA packing: row r is query q_off + r // GROUP of the block, head kv_head * GROUP + r % GROUP.
    Returns row_ok [BLOCK_M] (a real query), the block's first and last query positions, and per row
    row_pos (its query's position), token (its row of q/out) and head, all [BLOCK_M]."""
    rows = tl.arange(0, BLOCK_M)
    row_q = rows // GROUP
    row_ok = (row_q < BLOCK_Q) & (q_off + row_q < num_q)
    first_pos = seq_len - num_q + q_off
    last_pos = tl.minimum(first_pos + BLOCK_Q, seq_len) - 1
    row_pos = tl.minimum(first_pos + row_q, last_pos)  # padding rows borrow a real position
    token = (q_start + q_off + tl.minimum(row_q, num_q - q_off - 1)).to(tl.int64)
    head = kv_head * GROUP + rows % GROUP
    return row_ok, first_pos, last_pos, row_pos, token, head


@jit_helper
def _attend(
    q,  # [BLOCK_M, HEAD_DIM_PAD]
    k_cache_ptr, v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    seq, kv_head,
    row_pos,  # [BLOCK_M] position of each row's query
    first_pos, last_pos,  # positions of the block's first and last query
    d, d_ok,  # [HEAD_DIM_PAD] channel index, channel < HEAD_DIM
    split, split_len, qk_scale, sliding_window,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, TILE_N: tl.constexpr,
    SLIDING: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online softmax over this split's visible keys: (m_i, l_i) [BLOCK_M] running max and sum of
    exp2(scores - m_i), acc [BLOCK_M, HEAD_DIM_PAD] the unnormalized output, all fp32."""
    lo, mid_lo, mid_hi, hi, split_lo, split_hi = _key_bounds(
        first_pos, last_pos, split, split_len, sliding_window, TILE_N, SLIDING, SPLIT)
    k_base = k_cache_ptr + kv_head * stride_kh  # [num_blocks, block_size, head_dim]
    v_base = v_cache_ptr + kv_head * stride_vh
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt  # [max_blocks_per_seq]: this sequence's row
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: a row whose keys are all masked stays NaN-free
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    # Phase 0: masked tiles at the sliding window's lower edge; 1: unmasked tiles; 2: masked tiles
    # at the causal diagonal (and the partial last tile of a decode).
    for phase in tl.static_range(3):
        if phase == 0:
            start = tl.maximum(lo, split_lo)
            end = tl.minimum(mid_lo, split_hi)
        elif phase == 1:
            start = tl.maximum(mid_lo, split_lo)
            end = tl.minimum(mid_hi, split_hi)
        else:
            start = tl.maximum(mid_hi, split_lo)
            end = tl.minimum(hi, split_hi)
        if SLIDING or phase != 0:
            # One K/V tile of the online softmax per step, inline: as a helper, the labels its debug
            # line ranges add to the PTX led ptxas to schedule this loop differently (NOTES v11).
            for k0 in range(start, end, TILE_N):
                keys = k0 + tl.arange(0, TILE_N)
                if phase == 1:
                    blocks = tl.load(table + keys // BLOCK_SIZE)
                    kv_mask = d_ok[None, :]
                else:
                    blocks = tl.load(table + keys // BLOCK_SIZE, mask=keys < hi, other=0)
                    kv_mask = (keys < hi)[:, None] & d_ok[None, :]
                slot = blocks.to(tl.int64) * stride_kb + (keys % BLOCK_SIZE) * stride_kt
                k = tl.load(k_base + slot[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, TILE_N]
                if phase != 1:
                    visible = keys[None, :] <= row_pos[:, None]
                    if SLIDING:
                        visible &= keys[None, :] > row_pos[:, None] - sliding_window
                    s = tl.where(visible, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                slot_v = blocks.to(tl.int64) * stride_vb + (keys % BLOCK_SIZE) * stride_vt
                v = tl.load(v_base + slot_v[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
                m_i = m_new
    return m_i, l_i, acc


@jit_helper
def _key_bounds(first_pos, last_pos, split, split_len, sliding_window,
                TILE_N: tl.constexpr, SLIDING: tl.constexpr, SPLIT: tl.constexpr):
    """(lo, mid_lo, mid_hi, hi, split_lo, split_hi) for a query block at positions first_pos..last_pos:
    keys [lo, hi) are visible to some row, [mid_lo, mid_hi) to every row (those tiles need no mask);
    this split walks keys [split_lo, split_hi). lo, mid_lo and mid_hi are multiples of TILE_N."""
    hi = last_pos + 1
    mid_hi = (first_pos + 1) // TILE_N * TILE_N
    if SLIDING:
        lo = tl.maximum(first_pos - sliding_window + 1, 0) // TILE_N * TILE_N
        mid_lo = tl.minimum(tl.cdiv(tl.maximum(last_pos - sliding_window + 1, 0), TILE_N) * TILE_N, mid_hi)
    else:
        lo = 0
        mid_lo = 0
    if SPLIT:
        split_lo = split * split_len
        split_hi = tl.where(split == tl.num_programs(1) - 1, hi, split_lo + split_len)
    else:
        split_lo = 0
        split_hi = hi
    return lo, mid_lo, mid_hi, hi, split_lo, split_hi


@jit_helper
def _store_partial(
    part_out_ptr,  # fp32 [num_splits, num_tokens, num_heads, head_dim]
    part_lse_ptr,  # fp32 [num_splits, num_tokens, num_heads]
    m_i, l_i,  # [BLOCK_M] as _attend returns them
    acc,  # [BLOCK_M, HEAD_DIM_PAD]
    split, num_tokens,
    token, head, row_ok,  # [BLOCK_M] from _pack_rows
    d, d_ok,  # [HEAD_DIM_PAD]
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """This split's normalized output and log2-sum-exp2 per row, for _merge_splits."""
    # A split that saw no key of a row leaves l_i == 0: lse = -inf, output 0, weight 0 in the merge.
    lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.maximum(l_i, 1.0e-30)), float("-inf"))
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    part_row = (split * num_tokens + token) * NUM_HEADS + head
    tl.store(part_lse_ptr + part_row, lse, mask=row_ok)
    tl.store(part_out_ptr + part_row[:, None] * HEAD_DIM + d[None, :], o, mask=row_ok[:, None] & d_ok[None, :])


@jit_helper
def _merge_splits(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    part_out_ptr,  # fp32 [num_splits, num_tokens, num_heads, head_dim]
    part_lse_ptr,  # fp32 [num_splits, num_tokens, num_heads]
    kv_head, q_start, num_q, q_off, num_tokens,
    d, d_ok,  # [HEAD_DIM_PAD]
    stride_ot, stride_oh,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, MERGE_ROWS: tl.constexpr, MERGE_CHUNK: tl.constexpr,
):
    """Combine every split's partial output of this (query block, KV head) into out."""
    # Merge over the real rows only (decode pads GROUP rows to 16 for tl.dot), MERGE_CHUNK
    # splits per load so the reads overlap instead of costing a round trip per split.
    mr = tl.arange(0, MERGE_ROWS)
    mr_ok = (mr < BLOCK_Q * GROUP) & (q_off + mr // GROUP < num_q)
    mr_token = (q_start + q_off + tl.minimum(mr // GROUP, num_q - q_off - 1)).to(tl.int64)
    mr_head = kv_head * GROUP + mr % GROUP
    c = tl.arange(0, MERGE_CHUNK)
    m = tl.full([MERGE_ROWS], -1.0e30, tl.float32)
    den = tl.zeros([MERGE_ROWS], tl.float32)
    merged = tl.zeros([MERGE_ROWS, HEAD_DIM_PAD], tl.float32)
    for s0 in range(0, tl.num_programs(1), MERGE_CHUNK):
        sp = s0 + c
        row_sp = (sp[None, :] * num_tokens + mr_token[:, None]) * (NUM_KV_HEADS * GROUP) + mr_head[:, None]
        ok = mr_ok[:, None] & (sp < tl.num_programs(1))[None, :]  # [MERGE_ROWS, MERGE_CHUNK]
        lse_c = tl.load(part_lse_ptr + row_sp, mask=ok, other=float("-inf"), cache_modifier=".cg")
        o_c = tl.load(part_out_ptr + row_sp[:, :, None] * HEAD_DIM + d[None, None, :],
                      mask=ok[:, :, None] & d_ok[None, None, :], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, tl.max(lse_c, axis=1))
        keep = tl.exp2(m - m_new)
        w = tl.exp2(lse_c - m_new[:, None])  # [MERGE_ROWS, MERGE_CHUNK]; 0 for empty splits
        den = den * keep + tl.sum(w, axis=1)
        merged = merged * keep[:, None] + tl.sum(o_c * w[:, :, None], axis=1)
        m = m_new
    merged = merged / tl.where(den == 0.0, 1.0, den)[:, None]
    tl.store(out_ptr + mr_token[:, None] * stride_ot + mr_head[:, None] * stride_oh + d[None, :],
             merged.to(out_ptr.dtype.element_ty), mask=mr_ok[:, None] & d_ok[None, :])


def _check_inputs(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, sliding_window) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"bad shapes: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, "
                         f"v_cache {tuple(v_cache.shape)}")
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim or num_heads % num_kv_heads != 0:
        raise ValueError(f"q {tuple(q.shape)} does not fit k_cache {tuple(k_cache.shape)}")
    if head_dim > 256:
        raise ValueError(f"head_dim {head_dim} > 256 is not supported")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q dtype {q.dtype} is not fp16, bf16 or fp32")
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in (q.dtype, torch.float8_e4m3fn):
        raise TypeError(f"q {q.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype} must match "
                        "(or the caches be float8_e4m3fn)")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, strides {t.stride()}")
    num_seqs = seq_lens.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be int32 [num_seqs={num_seqs}, max_blocks], got "
                         f"{block_tables.dtype} {tuple(block_tables.shape)}")
    for name, t, n in (("seq_lens", seq_lens, num_seqs), ("query_start_loc", query_start_loc, num_seqs + 1)):
        if t.dtype != torch.int32 or t.shape != (n,) or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous int32 [{n}], got {t.dtype} {tuple(t.shape)}")
    devices = {t.device for t in (q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)}
    if len(devices) != 1:
        raise ValueError(f"tensors on several devices: {devices}")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    config: AttentionConfig | None = None,
    out: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """The Triton path (CPU tensors run under TRITON_INTERPRET=1). Hints left as None cost a device
    sync; a wrong hint is still correct (the last split takes the rest, a missed decode guess searches),
    only slower. ``out`` may be given (same shape and dtype as q, last dimension contiguous); tokens
    past query_start_loc[-1] are not written. ``config`` overrides choose_config (tests, tuning).
    Split launches share per-device tickets: calls on one GPU must not run concurrently on two streams.
    ``k_scale`` / ``v_scale``: the per-tensor scales of an fp8 cache (ignored for other caches)."""
    _check_inputs(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, sliding_window)
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out {out.dtype} {tuple(out.shape)} does not match q {q.dtype} {tuple(q.shape)}")
    if num_tokens == 0 or num_seqs == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    if config is None:
        config = choose_config(num_tokens, num_seqs, num_heads, num_kv_heads, head_dim, q.dtype,
                               max_query_len, max_seq_len, sm_count(q))
    head_dim_pad = next_power_of_2(head_dim)
    kv_fp8 = k_cache.dtype == torch.float8_e4m3fn
    split = config.num_splits > 1
    part = out  # unused without splits
    if split:
        part = torch.empty(config.num_splits * num_tokens * num_heads * (head_dim + 1), dtype=torch.float32,
                           device=q.device)
    num_query_blocks = count_query_blocks(num_tokens, num_seqs, config.block_q)
    grid = (num_query_blocks * num_kv_heads, config.num_splits)
    counters = split_counters(q.device, grid[0]) if split else seq_lens  # unused without splits
    merge_rows = next_power_of_2(config.block_q * (num_heads // num_kv_heads))
    _paged_attention_kernel[grid](
        out, part, counters, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        scale * _LOG2E * (k_scale if kv_fp8 else 1.0), float(v_scale),
        num_seqs, num_tokens, num_query_blocks, config.split_len, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        NUM_KV_HEADS=num_kv_heads, GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad, BLOCK_SIZE=block_size, BLOCK_Q=config.block_q, BLOCK_M=config.block_m,
        TILE_N=config.tile_n, SEARCH=128,
        SLIDING=sliding_window is not None, SPLIT=split, MERGE_ROWS=merge_rows,
        MERGE_CHUNK=max(1, min(16, next_power_of_2(config.num_splits), 8192 // (merge_rows * head_dim_pad))),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", KV_FP8=kv_fp8,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Attention of ``q`` over the paged cache; max_query_len / max_seq_len are host-side hints. CUDA
    tensors take the Triton kernel, the rest torch's SDPA over gathered K/V (paged_attention_cpu.py).
    An fp8 cache holds K / k_scale and V / v_scale."""
    if use_triton(q):
        return paged_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                                      sliding_window, max_query_len, max_seq_len,
                                      k_scale=k_scale, v_scale=v_scale)
    return paged_attention_sdpa(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window,
                                k_scale, v_scale)
