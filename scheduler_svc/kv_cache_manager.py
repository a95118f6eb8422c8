"""Per-sequence block tables on top of the block pool.

A sequence's block table maps its logical block i (tokens ``i*block_size .. (i+1)*block_size-1``) to a
physical block. Sharing decisions are made here and in the scheduler; reference counts are changed
only by the pool.
"""

from __future__ import annotations

from scheduler_svc.block_pool import BlockPool, KVBlock


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.pool = pool
        self.block_size = block_size
        self.block_tables: dict[int, list[KVBlock]] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def num_new_blocks(self, seq_id: int, num_tokens: int) -> int:
        """Blocks to add so that ``seq_id``'s table covers ``num_tokens`` token slots."""
        held = len(self.block_tables.get(seq_id, ()))
        return max(0, self.num_blocks_for(num_tokens) - held)

    def can_allocate(self, seq_id: int, num_tokens: int) -> bool:
        return self.num_new_blocks(seq_id, num_tokens) <= self.pool.num_free_blocks

    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        """Grows ``seq_id``'s table to cover ``num_tokens`` slots; returns the new block ids."""
        needed = self.num_new_blocks(seq_id, num_tokens)
        if needed > self.pool.num_free_blocks:
            raise ValueError(
                f"sequence {seq_id} needs {needed} blocks, {self.pool.num_free_blocks} free; "
                "check can_allocate first"
            )
        new_blocks = self.pool.allocate(needed)
        self.block_tables.setdefault(seq_id, []).extend(new_blocks)
        return [b.block_id for b in new_blocks]

    def free(self, seq_id: int) -> None:
        """Releases the sequence's blocks, tail first, so tails are evicted before shared prefixes."""
        table = self.block_tables.pop(seq_id, None)
        if table:
            self.pool.release(reversed(table))

    def block_ids(self, seq_id: int) -> list[int]:
        return [b.block_id for b in self.block_tables.get(seq_id, ())]

    def has(self, seq_id: int) -> bool:
        return seq_id in self.block_tables
