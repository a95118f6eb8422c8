"""Building one step's flattened varlen batch on the host with numpy, from persistent per-sequence
state: every live sequence owns a row of a block-table array that is updated incrementally, so a decode
step touches O(new blocks) table entries rather than whole tables."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class BlockTableRows:
    """Rows of a [capacity, max_blocks] int32 array, one per live sequence; grows on demand."""

    def __init__(self, max_blocks_per_seq: int, capacity: int = 64) -> None:
        self.max_blocks = max_blocks_per_seq
        self.table = np.zeros((capacity, max_blocks_per_seq), dtype=np.int32)
        self.free_rows = list(range(capacity - 1, -1, -1))

    def acquire(self) -> int:
        if not self.free_rows:
            old = self.table.shape[0]
            self.table = np.concatenate([self.table, np.zeros_like(self.table)])
            self.free_rows = list(range(2 * old - 1, old - 1, -1))
        return self.free_rows.pop()

    def release(self, row: int) -> None:
        self.free_rows.append(row)

    def sync(self, state) -> None:
        """Copies block ids the row lacks; ``state.num_synced_blocks = 0`` forces a full rewrite."""
        table = state.block_table
        n = len(table)
        if n > self.max_blocks:
            raise ValueError(f"sequence {state.seq_id}: {n} blocks exceed the {self.max_blocks} per sequence")
        if state.num_synced_blocks < n:
            start = state.num_synced_blocks
            self.table[state.row, start:n] = table[start:n]
            state.num_synced_blocks = n


@dataclass(slots=True)
class StepInputs:
    input_ids: np.ndarray  # [num_tokens] int64
    positions: np.ndarray  # [num_tokens] int64
    slot_mapping: np.ndarray  # [num_tokens] int64
    seq_lens: np.ndarray  # [num_seqs] int32
    query_start_loc: np.ndarray  # [num_seqs + 1] int32
    block_tables: np.ndarray  # [num_seqs, max_blocks_in_batch] int32
    logits_indices: np.ndarray  # [num_sampled] int64, index of each sampling sequence's last token
    sample_states: list  # SeqState of each entry of logits_indices
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def decode_only(self) -> bool:
        return self.max_query_len == 1


def build_inputs(batch: list, rows: BlockTableRows, block_size: int) -> StepInputs:
    """``batch``: (SeqState, num_scheduled_tokens) in batch order; advances num_computed_tokens."""
    num_seqs = len(batch)
    num_tokens = sum(n for _, n in batch)
    input_ids = np.empty(num_tokens, dtype=np.int64)
    positions = np.empty(num_tokens, dtype=np.int64)
    slots = np.empty(num_tokens, dtype=np.int64)
    seq_lens = np.empty(num_seqs, dtype=np.int32)
    query_start = np.zeros(num_seqs + 1, dtype=np.int32)
    row_ids = np.empty(num_seqs, dtype=np.int64)
    logits_indices = []
    sample_states = []
    t = 0
    max_query_len = 0
    for i, (state, n) in enumerate(batch):
        rows.sync(state)
        start = state.num_computed_tokens
        end = start + n
        if end > len(state.token_ids):
            raise ValueError(f"sequence {state.seq_id}: step reaches token {end} of {len(state.token_ids)}")
        if -(-end // block_size) > len(state.block_table):
            raise ValueError(f"sequence {state.seq_id}: {end} tokens but {len(state.block_table)} blocks")
        if n == 1:  # decode: scalar work only
            input_ids[t] = state.token_ids[start]
            positions[t] = start
            slots[t] = state.block_table[start // block_size] * block_size + start % block_size
        else:
            input_ids[t : t + n] = state.token_ids[start:end]
            pos = np.arange(start, end)
            positions[t : t + n] = pos
            slots[t : t + n] = rows.table[state.row, pos // block_size].astype(np.int64) * block_size + pos % block_size
        t += n
        query_start[i + 1] = t
        seq_lens[i] = end
        row_ids[i] = state.row
        max_query_len = max(max_query_len, n)
        state.num_computed_tokens = end
        if end == len(state.token_ids):
            logits_indices.append(t - 1)
            sample_states.append(state)
    max_seq_len = int(seq_lens.max()) if num_seqs else 0
    max_blocks = -(-max_seq_len // block_size)
    return StepInputs(
        input_ids=input_ids,
        positions=positions,
        slot_mapping=slots,
        seq_lens=seq_lens,
        query_start_loc=query_start,
        block_tables=rows.table[row_ids, :max_blocks],
        logits_indices=np.asarray(logits_indices, dtype=np.int64),
        sample_states=sample_states,
        max_query_len=max_query_len,
        max_seq_len=max_seq_len,
    )
