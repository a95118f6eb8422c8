"""Paged attention on CPU: the reference's semantics, through torch's scaled_dot_product_attention.

The reference (paged_attention.py) loops over sequences with two einsums, a repeat of K/V per query
head and a softmax each: on a 2-core CPU serving SmolLM2-135M at 8 streams that was three quarters of
a decode step. Here the decode rows of a step (one query each) share a single SDPA call over K/V
gathered row by row into a [num_decode, max_seq_len] padding, and each sequence with several queries
(a prefill chunk) has its own call with a causal mask aligned to its last key. GQA costs no copy: a
KV head's query heads stack as that head's query rows.

Only slots a sequence has written are read: padding positions past a sequence's end read the
sequence's first slot (always written) and are masked. So stale or NaN contents of the pool cannot
leak into the output, as in the Triton kernel, which masks its loads.

An fp8 (e4m3) cache is emulated: the gathered K/V are converted to the query's dtype and multiplied by
their per-tensor scales, so the arithmetic is fp32 on the values the cache holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def paged_attention_sdpa(
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
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]; rows past query_start_loc[-1] are left unset
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    k_rows = _Rows(k_cache.view(-1, num_kv_heads, head_dim), q.dtype, k_scale)  # [num_slots, H_kv, D]
    v_rows = _Rows(v_cache.view(-1, num_kv_heads, head_dim), q.dtype, v_scale)
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    decode = [s for s in range(len(lens)) if starts[s + 1] - starts[s] == 1]
    if decode:
        num = len(decode)
        # Decode rows are usually one run (the runner puts running sequences together): slice, not index.
        if decode[-1] - decode[0] == num - 1 and starts[decode[-1]] - starts[decode[0]] == num - 1:
            seqs, rows = slice(decode[0], decode[-1] + 1), slice(starts[decode[0]], starts[decode[0]] + num)
        else:
            seqs = torch.tensor(decode, device=q.device)
            rows = query_start_loc[seqs].long()
        slots, allowed = _gather_slots(block_tables[seqs], seq_lens[seqs], max(lens[s] for s in decode),
                                       block_size, sliding_window)  # [B, L]
        # k, v: [B, H_kv, L, D]; index_select on flat slots is several times faster on CPU than indexing
        k = k_rows.index_select(0, slots.view(-1)).view(*slots.shape, num_kv_heads, head_dim).transpose(1, 2)
        v = v_rows.index_select(0, slots.view(-1)).view(*slots.shape, num_kv_heads, head_dim).transpose(1, 2)
        qd = q[rows].view(num, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [B, H_kv, group, D]
        o = F.scaled_dot_product_attention(qd, k, v, attn_mask=allowed[:, None, None, :], scale=scale)
        out[rows] = o.reshape(num, num_heads, head_dim)
    for s, seq_len in enumerate(lens):
        q0, q1 = starts[s], starts[s + 1]
        if q1 - q0 > 1:
            out[q0:q1] = _prefill_chunk(q[q0:q1], k_rows, v_rows, block_tables[s], seq_len, block_size, scale,
                                        sliding_window)
    return out


class _Rows:
    """Cache rows [num_slots, H_kv, D] whose index_select returns them in the query's dtype: an fp8
    cache's rows are dequantized (gathered as bytes, since CPU float8 tensors cannot be indexed)."""

    def __init__(self, rows: torch.Tensor, dtype: torch.dtype, scale: float):
        self.rows, self.dtype, self.scale = rows, dtype, scale
        self.fp8 = rows.dtype == torch.float8_e4m3fn
        self.shape = rows.shape

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        if not self.fp8:
            return self.rows.index_select(dim, index)
        raw = self.rows.view(torch.uint8).index_select(dim, index).view(torch.float8_e4m3fn)
        return (raw.to(torch.float32) * self.scale).to(self.dtype)


def _gather_slots(
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    max_len: int,
    block_size: int,
    sliding_window: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot of each (sequence, key position) [B, max_len] int64 and whether the sequence's last token
    may attend to it [B, max_len] bool; positions past a sequence's end take its position 0."""
    pos = torch.arange(max_len, device=block_tables.device)[None, :]
    lens = seq_lens.long()[:, None]
    inside = pos < lens
    pos = torch.where(inside, pos, 0)
    slots = block_tables.long().gather(1, pos // block_size) * block_size + pos % block_size
    allowed = inside if sliding_window is None else inside & (pos > lens - 1 - sliding_window)
    return slots, allowed


def _prefill_chunk(
    q: torch.Tensor,  # [n, H, D]: the sequence's last n positions
    k_rows: torch.Tensor,  # [num_slots, H_kv, D]
    v_rows: torch.Tensor,
    block_table: torch.Tensor,  # [max_blocks] int32
    seq_len: int,
    block_size: int,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:  # [n, H, D]
    n, num_heads, _ = q.shape
    pos = torch.arange(seq_len, device=block_table.device)
    slots = block_table[: -(-seq_len // block_size)].long().repeat_interleave(block_size)[:seq_len] * block_size \
        + pos % block_size
    k = k_rows.index_select(0, slots).transpose(0, 1)[None]  # [1, H_kv, L, D]
    v = v_rows.index_select(0, slots).transpose(0, 1)[None]
    qs = q.transpose(0, 1)[None]  # [1, H, n, D]
    gqa = num_heads != k.shape[1]
    if n == seq_len and sliding_window is None:  # the whole sequence: the plain causal mask
        o = F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        q_pos = pos[seq_len - n:, None]  # query i sits at position seq_len - n + i
        allowed = pos[None, :] <= q_pos
        if sliding_window is not None:
            allowed &= pos[None, :] > q_pos - sliding_window
        o = F.scaled_dot_product_attention(qs, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)
    return o[0].transpose(0, 1)
