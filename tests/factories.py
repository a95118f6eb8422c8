"""Small builders the tests share: demo checkpoints and a toy paged runner for model tests."""

import random
from pathlib import Path

import torch

from gpu_worker.attention_metadata import AttentionMetadata
from gpu_worker.demo_model import write_demo_model
from gpu_worker.model_config import ModelConfig


def make_checkpoint(path: str | Path, arch: str = "llama", **overrides) -> Path:
    """A tiny random checkpoint with the demo tokenizer (see gpu_worker.demo_model)."""
    return write_demo_model(path, arch, **overrides)


class PagedSequences:
    """The runner's bookkeeping in miniature: a KV pool whose blocks are handed out in shuffled order,
    a block table and a computed-token count per sequence, and the AttentionMetadata of one step.

    Unwritten cache slots hold NaN, so attention that reads a slot it must not shows up in the output.
    """

    def __init__(
        self,
        config: ModelConfig,
        block_size: int,
        num_blocks: int,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ):
        self.block_size = block_size
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.kv_caches = [
            (torch.full(shape, float("nan"), dtype=dtype), torch.full(shape, float("nan"), dtype=dtype))
            for _ in range(config.num_layers)
        ]
        self.free_block_ids = list(range(num_blocks))
        random.Random(seed).shuffle(self.free_block_ids)
        self.block_tables: dict[int, list[int]] = {}
        self.num_computed_tokens: dict[int, int] = {}

    def prepare(
        self, chunks: list[tuple[int, list[int]]]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Inputs of one step in which sequence ``seq_id`` computes ``token_ids`` next, per chunk."""
        input_ids, positions, slots, seq_lens, starts = [], [], [], [], [0]
        for seq_id, token_ids in chunks:
            start = self.num_computed_tokens.setdefault(seq_id, 0)
            table = self.block_tables.setdefault(seq_id, [])
            seq_len = start + len(token_ids)
            while len(table) * self.block_size < seq_len:
                table.append(self.free_block_ids.pop())
            for pos in range(start, seq_len):
                slots.append(table[pos // self.block_size] * self.block_size + pos % self.block_size)
            input_ids += token_ids
            positions += range(start, seq_len)
            seq_lens.append(seq_len)
            starts.append(starts[-1] + len(token_ids))
            self.num_computed_tokens[seq_id] = seq_len
        tables = [self.block_tables[seq_id] for seq_id, _ in chunks]
        width = max(len(t) for t in tables)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            max_query_len=max(len(ids) for _, ids in chunks),
            max_seq_len=max(seq_lens),
        )
        return torch.tensor(input_ids), torch.tensor(positions), meta

    @torch.inference_mode()
    def step(self, model: torch.nn.Module, chunks: list[tuple[int, list[int]]]) -> list[torch.Tensor]:
        """Run one step; returns each chunk's logits [len(token_ids), vocab] (fp32)."""
        input_ids, positions, meta = self.prepare(chunks)
        logits = model.compute_logits(model(input_ids, positions, self.kv_caches, meta))
        return list(logits.split([len(ids) for _, ids in chunks]))
