"""The bookkeeping around the decode CUDA graphs, on CPU: the batch-size ladder, which steps fit a
graph, and what run() writes into the static buffers (inputs, padding rows, fixups) before a replay.

Capture needs CUDA, so the tests stand in for it: each "graph" re-runs the model's forward over the
static buffers into the same output tensor, which is what replaying a captured graph does. The model
returns, per row, the inputs that row read, so the logits show what a replay would have seen.
Capturing and replaying real graphs is covered by the GPU tests.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gpu_worker.cuda_graphs import DecodeGraphs, default_sizes
from gpu_worker.input_batch import BlockTableRows, build_inputs

BS = 4
MAX_MODEL_LEN = 64


class EchoModel(torch.nn.Module):
    """Logits row i = (input id, position, slot, seq_len, block_tables[i, 0], block_tables[i, 1])."""

    def __init__(self) -> None:
        super().__init__()
        self.metas = []

    def forward(self, input_ids, positions, kv_caches, meta):
        self.metas.append(meta)
        tables = meta.block_tables
        cols = [input_ids, positions, meta.slot_mapping, meta.seq_lens, tables[:, 0], tables[:, 1]]
        return torch.stack([c.to(torch.float32) for c in cols], dim=1)  # [n, 6]

    def compute_logits(self, hidden):
        return hidden


class ReplayOnCpu:
    """Stands in for a captured torch.cuda.CUDAGraph of ``n`` rows."""

    def __init__(self, graphs: DecodeGraphs, n: int) -> None:
        self.graphs, self.n = graphs, n
        self.num_replays = 0

    def replay(self) -> None:
        self.num_replays += 1
        self.graphs.logits[self.n].copy_(self.graphs._forward(self.n))


def make_graphs(max_batch: int = 8, captured: bool = True) -> DecodeGraphs:
    graphs = DecodeGraphs(EchoModel(), [], torch.device("cpu"), max_batch, max_blocks_per_seq=4,
                          max_model_len=MAX_MODEL_LEN)
    if captured:
        for n in graphs.sizes:
            graphs.graphs[n] = ReplayOnCpu(graphs, n)
            graphs.logits[n] = graphs._forward(n)
    return graphs


def new_seq(rows: BlockTableRows, seq_id: int, token_ids: list[int], block_table: list[int], computed: int = 0):
    """The fields of the runner's SeqState that build_inputs uses."""
    return SimpleNamespace(seq_id=seq_id, token_ids=token_ids, num_computed_tokens=computed, block_table=block_table,
                           row=rows.acquire(), num_synced_blocks=0)


def decode_inputs(rows: BlockTableRows, specs):
    """specs: (num_tokens, block_table) per sequence; each decodes its last token."""
    seqs = [new_seq(rows, i, list(range(100 * i, 100 * i + n)), table, computed=n - 1)
            for i, (n, table) in enumerate(specs)]
    return build_inputs([(s, 1) for s in seqs], rows, BS)


def test_the_ladder_of_batch_sizes():
    assert default_sizes(1) == [1]
    assert default_sizes(8) == [1, 2, 4, 8]
    assert default_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert default_sizes(300) == [1, 2, 4, 8, *range(16, 256, 16), 256, 288, 300]
    assert default_sizes(1024)[-3:] == [960, 992, 1024]
    assert default_sizes(2000)[-2:] == [1024, 2000]
    sizes = default_sizes(256)
    assert sizes == sorted(set(sizes)) and sizes[-1] == 256


def test_only_decode_steps_within_the_largest_graph_fit():
    rows = BlockTableRows(max_blocks_per_seq=4)
    graphs = make_graphs(max_batch=4)
    assert graphs.fits(decode_inputs(rows, [(3, [1])] * 4))
    assert not graphs.fits(decode_inputs(rows, [(3, [1])] * 5))  # more rows than the largest graph
    prefill = build_inputs([(new_seq(rows, 9, [1, 2, 3], [2]), 3)], rows, BS)
    assert not graphs.fits(prefill)
    assert not make_graphs(max_batch=4, captured=False).fits(decode_inputs(rows, [(3, [1])]))


def test_run_replays_the_smallest_graph_that_holds_the_batch_and_pads_it():
    rows = BlockTableRows(max_blocks_per_seq=4)
    graphs = make_graphs(max_batch=8)
    # Five rows first: the size-8 graph; its rows 5-7 are padding.
    five = decode_inputs(rows, [(1, [6]), (4, [2]), (9, [1, 3, 8]), (5, [7, 0]), (2, [5])])
    logits = graphs.run(five)
    assert logits.shape == (5, 6) and graphs.graphs[8].num_replays == 1
    assert logits.tolist() == [
        [0, 0, 24, 1, 6, 0], [103, 3, 11, 4, 2, 0], [208, 8, 32, 9, 1, 3], [304, 4, 0, 5, 7, 0], [401, 1, 21, 2, 5, 0]]
    padding = graphs.logits[8][5:]
    assert padding[:, 2].tolist() == [-1] * 3 and padding[:, 3].tolist() == [1] * 3  # no KV write, one key
    meta = graphs.model.metas[-1]
    assert (meta.max_query_len, meta.max_seq_len) == (1, MAX_MODEL_LEN)  # one graph for every context length
    assert meta.query_start_loc.tolist() == list(range(9))

    # Then three rows: the size-4 graph; row 3 was a real row of the last step and is padding now.
    three = decode_inputs(rows, [(2, [4]), (6, [3, 9]), (1, [2])])
    logits = graphs.run(three)
    assert graphs.graphs[4].num_replays == 1 and graphs.graphs[8].num_replays == 1
    assert logits.tolist() == [[1, 1, 17, 2, 4, 0], [105, 5, 37, 6, 3, 9], [200, 0, 8, 1, 2, 0]]
    assert graphs.logits[4][3, 2:4].tolist() == [-1, 1]


def test_fixups_replace_inputs_the_previous_step_is_still_sampling():
    rows = BlockTableRows(max_blocks_per_seq=4)
    graphs = make_graphs(max_batch=4)
    inputs = decode_inputs(rows, [(3, [1]), (5, [2, 3]), (2, [4])])
    fixups = (torch.tensor([0, 2]), torch.tensor([77, 88]))  # (rows, tokens still on the device)
    logits = graphs.run(inputs, fixups)
    assert logits[:, 0].tolist() == [77, 104, 88]
    assert logits[:, 1].tolist() == [2, 4, 1]  # positions are the host's
    assert np.array_equal(inputs.input_ids, [2, 104, 201])  # the host arrays are left alone


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_every_batch_size_up_to_the_largest_graph_runs(n):
    rows = BlockTableRows(max_blocks_per_seq=4)
    graphs = make_graphs(max_batch=4)
    inputs = decode_inputs(rows, [(k + 1, [k]) for k in range(n)])
    logits = graphs.run(inputs)
    assert logits[:, 0].tolist() == [100 * k + k for k in range(n)]
    assert sum(g.num_replays for g in graphs.graphs.values()) == 1
