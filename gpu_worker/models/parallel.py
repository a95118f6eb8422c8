"""Megatron-style tensor parallelism inside a model: which part of each weight a rank holds, and the two
collectives that join the parts.

A column-parallel linear needs no class of its own: a rank holds a row range of W (its output features,
e.g. its attention heads) as a plain nn.Linear, and its output stays split. The row-parallel linear after
it holds the matching column range of its own weight and sums the partial products over the ranks with
one all-reduce: an attention block or an MLP costs one all-reduce. Embedding tables and the LM head are
split by rows (vocabulary ids); the LM head's slices are gathered so that every rank has all the logits.

Every rank executes the same StepPlan, so every rank issues the same collectives in the same order.
``TPGroup()`` (one rank) issues none: tensor parallelism of size 1 costs nothing.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# torch 2.13 renames all_gather_into_tensor (the older name warns there); the GPU machines run 2.11.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class TPGroup:
    """This process's place among the tensor-parallel ranks. Collectives go through torch.distributed's
    default process group (a worker process belongs to exactly one), which exists when world_size > 1."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")

    def split(self, total: int, what: str) -> tuple[int, int]:
        """This rank's [start, stop) of ``total`` items split evenly; ValueError naming ``what`` when the
        items do not divide."""
        if total % self.world_size:
            raise ValueError(f"{what} {total} is not divisible by the tensor-parallel size {self.world_size}")
        size = total // self.world_size
        return self.rank * size, (self.rank + 1) * size

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """This rank's [start, stop) of the KV heads. With fewer KV heads than ranks, each rank holds the
        one KV head its query heads read (ranks r * num_kv_heads // world_size share it): KV heads are
        replicated, as in vLLM, which needs world_size to be a multiple of num_kv_heads."""
        if num_kv_heads >= self.world_size:
            return self.split(num_kv_heads, "num_key_value_heads")
        if self.world_size % num_kv_heads:
            raise ValueError(f"tensor-parallel size {self.world_size} is neither a divisor nor a multiple of "
                             f"num_key_value_heads {num_kv_heads}")
        head = self.rank * num_kv_heads // self.world_size
        return head, head + 1

    def rows(self, num_rows: int) -> tuple[int, int, int]:
        """(start, stop, rows held) of a table split by rows (vocabulary, positions) into equal shards of
        ceil(num_rows / world_size) rows; the last shards end in padding rows that hold no id."""
        held = -(-num_rows // self.world_size)
        start = min(self.rank * held, num_rows)
        return start, min(start + held, num_rows), held

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums ``x`` over the ranks, in place."""
        if self.world_size > 1:
            dist.all_reduce(x)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        # x: [n, k] -> [n, world_size * k], rank 0's columns first
        if self.world_size == 1:
            return x
        out = x.new_empty((self.world_size * x.shape[0], x.shape[1]))
        _all_gather_single(out, x.contiguous())
        return out.view(self.world_size, *x.shape).transpose(0, 1).reshape(x.shape[0], self.world_size * x.shape[1])


SINGLE = TPGroup()


class RowParallelLinear(nn.Linear):
    """y = sum over ranks of x_r @ W_r^T, + b: each rank holds the columns of W for its slice of the input
    features (``in_features`` is that slice's width) and the whole bias, added once after the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup):
        super().__init__(in_features, out_features, bias=bias)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, in_features of this rank] -> [T, out]
        if self.tp.world_size == 1:
            return F.linear(x, self.weight, self.bias)
        out = self.tp.all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias


class ParallelEmbedding(nn.Embedding):
    """An embedding table split by rows: rank r holds ids [start, stop) (``TPGroup.rows``); each rank
    looks up the ids it holds, zeros the others, and the sum over ranks is the whole lookup. Padding
    rows past the table's end are never read."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp: TPGroup):
        self.start, self.stop, held = tp.rows(num_embeddings)
        super().__init__(held, embedding_dim)
        self.num_rows = num_embeddings  # the whole table's
        self.tp = tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids: [T] -> [T, embedding_dim]
        if self.tp.world_size == 1:
            return F.embedding(ids, self.weight)
        held = (ids >= self.start) & (ids < self.stop)
        out = F.embedding(torch.where(held, ids - self.start, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill_(~held.unsqueeze(-1), 0.0))


@dataclass(frozen=True)
class Shard:
    """The part of a checkpoint tensor one rank reads: ``ranges`` along ``dim``, concatenated in order.
    ``size`` is the tensor's whole extent along ``dim``, checked first so that a checkpoint of the wrong
    shape is refused rather than cut to fit."""

    dim: int
    ranges: tuple[tuple[int, int], ...]
    size: int

    def read(self, ref) -> torch.Tensor:
        """``ref``: a tensor, or a lazy safetensors slice (only the ranges are read from the file)."""
        lead = (slice(None),) * self.dim
        parts = [ref[(*lead, slice(start, stop))] for start, stop in self.ranges]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.dim)


def rows_shard(start: int, stop: int, size: int) -> Shard:
    return Shard(0, ((start, stop),), size)


def cols_shard(start: int, stop: int, size: int) -> Shard:
    return Shard(1, ((start, stop),), size)
