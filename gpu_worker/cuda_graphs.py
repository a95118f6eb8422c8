"""CUDA graphs of the decode forward (model + LM head) for a ladder of batch sizes.

A decode step of n sequences replays the smallest captured graph of at least n rows. The graphs read
static input buffers; padding rows write nothing (slot -1) and attend to one token of block 0, and
their logits are ignored. Attention is captured with ``max_seq_len = max_model_len`` so one graph
serves every context length. Under tensor parallelism the graphs hold the NCCL collectives too; every
rank captures the same sizes in the same order, so replays meet in the same collectives.
"""

from __future__ import annotations

import bisect

import torch
import torch.distributed as dist

from gpu_worker.attention_metadata import AttentionMetadata
from gpu_worker.input_batch import StepInputs
from gpu_worker.staging import HostStaging


def default_sizes(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 256, 16)) + list(range(256, 1025, 32))
    return [s for s in sizes if s < max_batch] + [max_batch]


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        device: torch.device,
        max_batch: int,
        max_blocks_per_seq: int,
        max_model_len: int,
        staging: HostStaging | None = None,
    ) -> None:
        self.model = model
        self.staging = staging or HostStaging(device)
        self.kv_caches = kv_caches
        self.device = device
        self.max_model_len = max_model_len
        self.sizes = default_sizes(max_batch)
        b = max_batch
        self.input_ids = torch.zeros(b, dtype=torch.long, device=device)
        self.positions = torch.zeros(b, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((b,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(b, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(b + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((b, max_blocks_per_seq), dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def _forward(self, n: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:n],
            block_tables=self.block_tables[:n],
            seq_lens=self.seq_lens[:n],
            query_start_loc=self.query_start_loc[: n + 1],
            max_query_len=1,
            max_seq_len=self.max_model_len,
        )
        hidden = self.model(self.input_ids[:n], self.positions[:n], self.kv_caches, meta)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        # With a process group, NCCL's watchdog thread queries CUDA events while we capture: allowed in
        # "thread_local" mode, which forbids unsafe calls on this thread only; "global" would fail them.
        mode = "thread_local" if dist.is_available() and dist.is_initialized() else "global"
        for n in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            self._forward(n)  # warm-up: compiles kernels, settles allocations
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode=mode):
                self.logits[n] = self._forward(n)
            pool = graph.pool()
            self.graphs[n] = graph
        torch.cuda.synchronize(self.device)

    def fits(self, inputs: StepInputs) -> bool:
        return inputs.decode_only and inputs.num_seqs <= self.sizes[-1] and bool(self.graphs)

    def run(self, inputs: StepInputs, fixups: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits [num_seqs, vocab] of a decode-only step. ``fixups``: (rows, token ids on the device)
        for inputs that the previous step is still sampling."""
        n = inputs.num_seqs
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        # One asynchronous copy to the device, then device-side copies into the graphs' static buffers.
        input_ids, positions, slot_mapping, seq_lens, block_tables = self.staging.to_device(
            inputs.input_ids, inputs.positions, inputs.slot_mapping, inputs.seq_lens, inputs.block_tables)
        self.input_ids[:n].copy_(input_ids)
        if fixups is not None:
            self.input_ids[fixups[0]] = fixups[1]
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(slot_mapping)
        self.seq_lens[:n].copy_(seq_lens)
        self.block_tables[:n, : block_tables.shape[1]].copy_(block_tables)
        if size > n:  # padding rows: no KV write, one key of block 0
            self.slot_mapping[n:size].fill_(-1)
            self.seq_lens[n:size].fill_(1)
        self.graphs[size].replay()
        return self.logits[size][:n]
