"""Per-sequence block tables on top of the block pools: sharing, copy-on-write, prefix caching, swap.

A sequence's block table maps its logical block i (tokens ``i*block_size .. (i+1)*block_size-1``) to a
physical block. Sharing decisions are made here and in the scheduler; reference counts are changed
only by the pools.

Invariants:
- A block with ref_cnt > 1 is never written: the sequence about to write into it gets a fresh block
  and a (src, dst) copy for the workers first (copy-on-write).
- A block carrying a ``block_hash`` is full and never written again; prefix hits therefore stop before
  the last known token, which every admission computes.
- Swapped-out sequences hold CPU blocks (``cpu_tables``) and no device blocks; the CPU pool counts its
  own references, with the same sharing as the device tables had.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable

from scheduler_svc.block_pool import BlockPool, KVBlock
from scheduler_svc.request import Sequence

_NO_PARENT = bytes(16)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def hash_block(parent: int | None, token_ids: list[int]) -> int:
    """Hash of a full block: its tokens and, through the parent's hash, every token before it."""
    h = hashlib.blake2b(parent.to_bytes(16, "little") if parent is not None else _NO_PARENT, digest_size=16)
    h.update(array("I", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little")


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int, cpu_pool: BlockPool | None = None) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.pool = pool
        self.cpu_pool = cpu_pool
        self.block_size = block_size
        self.block_tables: dict[int, list[KVBlock]] = {}
        self.cpu_tables: dict[int, list[KVBlock]] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def enable_caching(self) -> bool:
        return self.pool.enable_caching

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

    # ---- writing: copy-on-write

    def num_blocks_needed(self, slots: Iterable[tuple[int, int, int]], cpu: bool = False) -> int:
        """Blocks that ``allocate_slots`` would take for these (seq_id, start, end) writes, in order.

        Counts new blocks and copies: a write into a block that others still hold after the earlier
        writers of the same call have moved off it needs a copy. With ``cpu``, counts against the CPU
        tables, as if they had been swapped in with their sharing."""
        tables = self.cpu_tables if cpu else self.block_tables
        moved: dict[KVBlock, int] = {}
        total = 0
        bs = self.block_size
        for seq_id, start, end in slots:
            table = tables.get(seq_id, ())
            last = cdiv(end, bs)
            total += max(0, last - len(table))
            for i in range(start // bs, min(len(table), last)):
                block = table[i]
                if block.ref_cnt - moved.get(block, 0) > 1:
                    moved[block] = moved.get(block, 0) + 1
                    total += 1
        return total

    def allocate_slots(
        self, seq_id: int, start: int, end: int
    ) -> tuple[list[int], list[tuple[int, int]], list[tuple[int, int]]]:
        """Makes slots ``start .. end-1`` writable by ``seq_id``: copies shared blocks it writes into and
        grows the table. Returns (new block ids appended, (src, dst) copies, (position, block id)
        table replacements)."""
        table = self.block_tables.setdefault(seq_id, [])
        bs = self.block_size
        copies: list[tuple[int, int]] = []
        replaced: list[tuple[int, int]] = []
        for i in range(start // bs, min(len(table), cdiv(end, bs))):
            block = table[i]
            if block.block_hash is not None:
                raise RuntimeError(f"sequence {seq_id} would write into cached block {block.block_id}")
            if block.ref_cnt > 1:
                (fresh,) = self.pool.allocate(1)
                self.pool.release([block])  # others still hold it
                table[i] = fresh
                copies.append((block.block_id, fresh.block_id))
                replaced.append((i, fresh.block_id))
        needed = cdiv(end, bs) - len(table)
        new_ids: list[int] = []
        if needed > 0:
            new_blocks = self.pool.allocate(needed)
            table.extend(new_blocks)
            new_ids = [b.block_id for b in new_blocks]
        return new_ids, copies, replaced

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares every block of the parent (one more reference each)."""
        table = self.block_tables[parent_id]
        self.pool.acquire(table)
        self.block_tables[child_id] = list(table)

    # ---- automatic prefix caching

    def block_hashes(self, seq: Sequence, num_tokens: int) -> list[int]:
        """Hashes of the full blocks among ``seq``'s first ``num_tokens`` tokens (cached on the seq)."""
        hashes = seq.block_hashes
        bs = self.block_size
        tokens = seq.token_ids
        for i in range(len(hashes), num_tokens // bs):
            hashes.append(hash_block(hashes[-1] if hashes else None, tokens[i * bs : (i + 1) * bs]))
        return hashes

    def cached_prefix(self, seq: Sequence) -> list[KVBlock]:
        """The cached blocks holding the longest prefix of ``seq``'s tokens, last token excluded."""
        if not self.enable_caching:
            return []
        hits = []
        for block_hash in self.block_hashes(seq, seq.num_tokens - 1):
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def adopt_prefix(self, seq: Sequence, hits: list[KVBlock]) -> None:
        """Starts ``seq``'s table with the prefix-hit blocks (one more reference each)."""
        self.pool.acquire(hits)
        self.block_tables[seq.seq_id] = list(hits)
        seq.num_hashed_blocks = len(hits)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Indexes the blocks that ``seq``'s computed tokens have filled since the last call."""
        full = seq.num_computed_tokens // self.block_size
        if full <= seq.num_hashed_blocks or not self.enable_caching:
            return
        hashes = self.block_hashes(seq, seq.num_computed_tokens)
        table = self.block_tables[seq.seq_id]
        for i in range(seq.num_hashed_blocks, full):
            self.pool.set_hash(table[i], hashes[i])
        seq.num_hashed_blocks = full

    # ---- swapping

    def _distinct(self, tables: dict[int, list[KVBlock]], seq_ids: list[int]) -> int:
        return len({id(b) for s in seq_ids for b in tables[s]})

    def num_swap_out_blocks(self, seq_ids: list[int]) -> int:
        return self._distinct(self.block_tables, seq_ids)

    def num_swap_in_blocks(self, seq_ids: list[int]) -> int:
        return self._distinct(self.cpu_tables, seq_ids)

    def can_swap_out(self, seq_ids: list[int]) -> bool:
        return self.cpu_pool is not None and self.num_swap_out_blocks(seq_ids) <= self.cpu_pool.num_free_blocks

    def swap_out(self, seq_ids: list[int]) -> list[tuple[int, int]]:
        """Moves the sequences' tables to CPU blocks, keeping their sharing; returns (device, cpu) ids."""
        assert self.cpu_pool is not None
        return self._move(self.block_tables, self.pool, self.cpu_tables, self.cpu_pool, seq_ids)

    def swap_in(self, seq_ids: list[int]) -> list[tuple[int, int]]:
        """Moves the sequences' tables back to device blocks; returns (cpu, device) ids."""
        assert self.cpu_pool is not None
        return self._move(self.cpu_tables, self.cpu_pool, self.block_tables, self.pool, seq_ids)

    @staticmethod
    def _move(src_tables, src_pool: BlockPool, dst_tables, dst_pool: BlockPool, seq_ids) -> list[tuple[int, int]]:
        mapping: dict[KVBlock, KVBlock] = {}
        pairs = []
        for seq_id in seq_ids:
            table = []
            for block in src_tables[seq_id]:
                dst = mapping.get(block)
                if dst is None:
                    (dst,) = dst_pool.allocate(1)
                    mapping[block] = dst
                    pairs.append((block.block_id, dst.block_id))
                else:
                    dst_pool.acquire([dst])
                table.append(dst)
            dst_tables[seq_id] = table
        for seq_id in seq_ids:
            src_pool.release(reversed(src_tables.pop(seq_id)))
        return pairs

    # ---- freeing

    def free(self, seq_id: int) -> None:
        """Releases the sequence's blocks, tail first, so tails are evicted before shared prefixes."""
        table = self.block_tables.pop(seq_id, None)
        if table:
            self.pool.release(reversed(table))
        cpu_table = self.cpu_tables.pop(seq_id, None)
        if cpu_table:
            assert self.cpu_pool is not None
            self.cpu_pool.release(reversed(cpu_table))

    def block_ids(self, seq_id: int) -> list[int]:
        return [b.block_id for b in self.block_tables.get(seq_id, ())]

    def has(self, seq_id: int) -> bool:
        return seq_id in self.block_tables
