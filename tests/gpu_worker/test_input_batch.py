"""The host side of a step: block-table rows kept per sequence and the flattened varlen inputs of a
mixed prefill + decode batch, checked element by element."""

from dataclasses import dataclass

import numpy as np
import pytest

from gpu_worker.input_batch import BlockTableRows, build_inputs

BS = 4  # block_size


@dataclass
class Seq:
    """The fields build_inputs reads and advances (the model runner's SeqState has more)."""

    seq_id: int
    token_ids: list[int]
    num_computed_tokens: int
    block_table: list[int]
    row: int = -1
    num_synced_blocks: int = 0


def new_seq(rows: BlockTableRows, seq_id: int, token_ids: list[int], block_table: list[int], computed: int = 0):
    return Seq(seq_id, token_ids, computed, block_table, row=rows.acquire())


def test_rows_are_handed_out_lowest_first_and_reused_after_release():
    rows = BlockTableRows(max_blocks_per_seq=3, capacity=4)
    assert [rows.acquire() for _ in range(3)] == [0, 1, 2]
    rows.release(1)
    assert rows.acquire() == 1
    assert rows.acquire() == 3


def test_rows_grow_when_full_and_keep_what_they_hold():
    rows = BlockTableRows(max_blocks_per_seq=2, capacity=2)
    a, b = new_seq(rows, 0, [1] * 8, [5, 6]), new_seq(rows, 1, [1] * 8, [7, 8])
    rows.sync(a)
    rows.sync(b)
    assert rows.acquire() == 2 and rows.table.shape == (4, 2)
    assert rows.acquire() == 3 and rows.acquire() == 4 and rows.table.shape == (8, 2)
    assert rows.table[:2].tolist() == [[5, 6], [7, 8]]
    assert rows.table.dtype == np.int32


def test_sync_copies_only_new_entries_unless_told_to_rewrite():
    rows = BlockTableRows(max_blocks_per_seq=4)
    seq = new_seq(rows, 0, [1] * 16, [3])
    rows.sync(seq)
    seq.block_table.append(9)
    seq.block_table[0] = 11  # replaced in place without resetting num_synced_blocks: not copied
    rows.sync(seq)
    assert rows.table[seq.row].tolist() == [3, 9, 0, 0] and seq.num_synced_blocks == 2
    seq.num_synced_blocks = 0  # what the runner does after a copy-on-write table update
    rows.sync(seq)
    assert rows.table[seq.row].tolist() == [11, 9, 0, 0]
    seq.block_table += [1, 2, 4]
    with pytest.raises(ValueError, match="5 blocks exceed the 4 per sequence"):
        rows.sync(seq)


def test_mixed_prefill_chunk_decode_and_cached_prefix_batch():
    rows = BlockTableRows(max_blocks_per_seq=4)
    # A: a 7-token prompt, first chunk of 5 tokens (no sampling yet)
    a = new_seq(rows, 10, list(range(100, 107)), [3, 7])
    # B: decoding its 6th token (position 5, block 9, offset 1)
    b = new_seq(rows, 11, list(range(200, 206)), [2, 9], computed=5)
    # C: 6-token prompt whose first block was a prefix-cache hit: positions 4 and 5 remain
    c = new_seq(rows, 12, list(range(300, 306)), [5, 1], computed=4)
    inputs = build_inputs([(a, 5), (b, 1), (c, 2)], rows, BS)

    assert inputs.input_ids.tolist() == [100, 101, 102, 103, 104, 205, 304, 305]
    assert inputs.positions.tolist() == [0, 1, 2, 3, 4, 5, 4, 5]
    # slot = block_id * block_size + position % block_size
    assert inputs.slot_mapping.tolist() == [12, 13, 14, 15, 28, 37, 4, 5]
    assert inputs.query_start_loc.tolist() == [0, 5, 6, 8]
    assert inputs.seq_lens.tolist() == [5, 6, 6]
    assert inputs.block_tables.tolist() == [[3, 7], [2, 9], [5, 1]]  # ceil(6 / 4) columns
    assert inputs.logits_indices.tolist() == [5, 7]  # B's token and C's last: A is mid-prompt
    assert inputs.sample_states == [b, c]
    assert (inputs.max_query_len, inputs.max_seq_len, inputs.num_seqs, inputs.decode_only) == (5, 6, 3, False)
    assert [s.num_computed_tokens for s in (a, b, c)] == [5, 6, 6]
    assert [x.dtype for x in (inputs.input_ids, inputs.positions, inputs.slot_mapping, inputs.logits_indices)] == [
        np.int64] * 4
    assert inputs.query_start_loc.dtype == inputs.seq_lens.dtype == np.int32

    # Next step: A's last two prompt tokens (block 7, offsets 1 and 2) and B's next token in a new block.
    b.token_ids.append(206)
    b.block_table.append(4)
    nxt = build_inputs([(b, 1), (a, 2)], rows, BS)
    assert nxt.input_ids.tolist() == [206, 105, 106]
    assert nxt.positions.tolist() == [6, 5, 6]
    assert nxt.slot_mapping.tolist() == [38, 29, 30]
    assert nxt.query_start_loc.tolist() == [0, 1, 3] and nxt.seq_lens.tolist() == [7, 7]
    assert nxt.block_tables.tolist() == [[2, 9], [3, 7]]
    assert nxt.logits_indices.tolist() == [0, 2] and nxt.sample_states == [b, a]


def test_decode_only_batch():
    rows = BlockTableRows(max_blocks_per_seq=4)
    seqs = [new_seq(rows, i, list(range(10 * i, 10 * i + n)), table, computed=n - 1)
            for i, (n, table) in enumerate([(1, [6]), (4, [2]), (9, [1, 3, 8]), (5, [7, 0])])]
    inputs = build_inputs([(s, 1) for s in seqs], rows, BS)
    assert inputs.decode_only and inputs.max_query_len == 1
    assert inputs.input_ids.tolist() == [0, 13, 28, 34]
    assert inputs.positions.tolist() == [0, 3, 8, 4]
    assert inputs.slot_mapping.tolist() == [24, 11, 32, 0]
    assert inputs.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert inputs.seq_lens.tolist() == [1, 4, 9, 5]
    assert inputs.block_tables.tolist() == [[6, 0, 0], [2, 0, 0], [1, 3, 8], [7, 0, 0]]
    assert inputs.logits_indices.tolist() == [0, 1, 2, 3] and inputs.max_seq_len == 9


def test_a_step_past_the_known_tokens_or_the_blocks_is_refused():
    rows = BlockTableRows(max_blocks_per_seq=4)
    seq = new_seq(rows, 5, [1, 2, 3], [0])
    with pytest.raises(ValueError, match="sequence 5: step reaches token 4 of 3"):
        build_inputs([(seq, 4)], rows, BS)
    seq = new_seq(rows, 6, [1] * 6, [0])
    with pytest.raises(ValueError, match="sequence 6: 6 tokens but 1 blocks"):
        build_inputs([(seq, 6)], rows, BS)
