"""Per-sequence block tables on top of the block pools: sharing, copy-on-write, prefix caching, swap.

A sequence's block table maps its logical block i (tokens ``i*block_size .. (i+1)*block_size-1``) to a
physical block. Sharing decisions are made here and in the scheduler; reference counts are changed
only by the pools. The tables are this module's own: the scheduler asks how many blocks a write, a
fork or an admission takes, and gets back block ids and copies (``SlotAllocation``), never blocks.

Invariants:
- A block with ref_cnt > 1 is never written: the sequence about to write into it gets a fresh block
  and a (src, dst) copy for the workers first (copy-on-write).
- A block carrying a ``block_hash`` is full and never written again; prefix hits therefore stop before
  the last known token, which every admission computes.
- Swapped-out sequences hold CPU blocks (``cpu_tables``) and no device blocks; the CPU pool counts its
  own references, with the same sharing as the device tables had.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from scheduler_svc.block_hash import extend_hashes
from scheduler_svc.block_pool import BlockPool, KVBlock
from scheduler_svc.request import Sequence


def cdiv(a: int, b: int) -> int:
    # The same line as kernels._triton.cdiv, kept here: importing kernels loads torch, which the scheduler
    # process (no model) never imports; a shared module for one expression would be a new bottom package.
    return -(-a // b)


@dataclass(slots=True)
class SlotAllocation:
    """What making slots writable changed in one sequence's block table, in the step plan's form."""

    new_block_ids: list[int]  # appended to the table
    copies: list[tuple[int, int]]  # (src, dst) copy-on-write: shared blocks the sequence writes into
    # (seq_id, positions, block ids): the table entries that the copies' destinations replaced; None
    # without copies.
    table_update: tuple[int, list[int], list[int]] | None


@dataclass(slots=True)
class PrefixHit:
    """Cached blocks holding a prefix of a sequence's tokens, found on admission, not yet adopted."""

    blocks: list[KVBlock]  # in table order
    block_size: int

    @property
    def num_tokens(self) -> int:
        return len(self.blocks) * self.block_size

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def drop_last(self) -> None:
        """Computes the last hit block's tokens again instead (the sequence has to compute them)."""
        self.blocks.pop()


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int, cpu_pool: BlockPool | None = None) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.pool = pool
        self.cpu_pool = cpu_pool
        self.block_size = block_size
        # seq_id -> block table, for running sequences (device blocks) and swapped ones (CPU blocks).
        self._tables: dict[int, list[KVBlock]] = {}
        self._cpu_tables: dict[int, list[KVBlock]] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def enable_caching(self) -> bool:
        return self.pool.enable_caching

    def num_blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def block_table(self, seq_id: int) -> list[int]:
        """The sequence's block table as block ids (empty for a sequence without device blocks)."""
        return [b.block_id for b in self._tables.get(seq_id, ())]

    # ---- writing: copy-on-write

    def num_blocks_to_write(self, seq_id: int, start: int, end: int) -> int:
        """Blocks that ``allocate_slots(seq_id, start, end)`` takes: new ones and copies. The one-writer
        case of ``num_blocks_needed``, on the scheduler's per-sequence path."""
        try:
            table = self._tables[seq_id]
        except KeyError:  # not admitted yet
            table = []
        bs = self.block_size
        held = len(table)
        first = start // bs
        if held <= first + 1:  # the common case: the table ends in or just before the first block written
            needed = (end + bs - 1) // bs - held
            if first < held and table[first].ref_cnt > 1:
                needed += 1
            return needed
        return self.num_blocks_needed(((seq_id, start, end),))

    def num_blocks_needed(self, slots: Iterable[tuple[int, int, int]], cpu: bool = False) -> int:
        """Blocks that ``allocate_slots`` would take for these (seq_id, start, end) writes, in order.

        Counts new blocks and copies: a write into a block that others still hold after the earlier
        writers of the same call have moved off it needs a copy. With ``cpu``, counts against the CPU
        tables, as if they had been swapped in with their sharing."""
        tables = self._cpu_tables if cpu else self._tables
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

    def num_blocks_to_fork(self, seq_id: int, position: int, num_seqs: int) -> int:
        """Blocks that ``num_seqs`` sequences sharing ``seq_id``'s table (it and its forks) take to
        write their slot ``position``."""
        table = self._tables[seq_id]
        i = position // self.block_size
        if i >= len(table):
            return num_seqs  # the slot starts a block: one new block each
        # Each writer but the last copies the block; the last keeps it unless others hold it too.
        return num_seqs - 1 + (table[i].ref_cnt > 1)

    def allocate_slots(self, seq_id: int, start: int, end: int) -> SlotAllocation:
        """Makes slots ``start .. end-1`` writable by ``seq_id``: copies shared blocks it writes into and
        grows the table."""
        table = self._tables.get(seq_id)
        if table is None:
            table = []  # registered only once its blocks are taken
        bs = self.block_size
        copies: list[tuple[int, int]] = []
        positions: list[int] = []
        replaced: list[int] = []
        for i in range(start // bs, min(len(table), cdiv(end, bs))):
            block = table[i]
            if block.block_hash is not None:
                raise RuntimeError(f"sequence {seq_id} would write into cached block {block.block_id}")
            if block.ref_cnt > 1:
                (fresh,) = self.pool.allocate(1)
                self.pool.release([block])  # others still hold it
                table[i] = fresh
                copies.append((block.block_id, fresh.block_id))
                positions.append(i)
                replaced.append(fresh.block_id)
        needed = cdiv(end, bs) - len(table)
        new_ids: list[int] = []
        if needed > 0:
            new_blocks = self.pool.allocate(needed)
            table.extend(new_blocks)
            new_ids = [b.block_id for b in new_blocks]
        self._tables[seq_id] = table
        return SlotAllocation(new_ids, copies, (seq_id, positions, replaced) if copies else None)

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares every block of the parent (one more reference each)."""
        table = self._tables[parent_id]
        self.pool.acquire(table)
        self._tables[child_id] = list(table)

    # ---- automatic prefix caching

    def block_hashes(self, seq: Sequence, num_tokens: int) -> list[int]:
        """Hashes of the full blocks among ``seq``'s first ``num_tokens`` tokens (cached on the seq)."""
        return extend_hashes(seq.block_hashes, seq.token_ids, self.block_size, num_tokens // self.block_size)

    def cached_prefix(self, seq: Sequence) -> PrefixHit:
        """The cached blocks holding the longest prefix of ``seq``'s tokens, last token excluded."""
        hit = PrefixHit([], self.block_size)
        if not self.enable_caching:
            return hit
        for block_hash in self.block_hashes(seq, seq.num_tokens - 1):
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hit.blocks.append(block)
        return hit

    def num_free_blocks_after(self, hit: PrefixHit) -> int:
        """Free blocks once ``hit`` is adopted: its blocks that nobody holds leave the free list."""
        return self.pool.num_free_blocks - sum(b.ref_cnt == 0 for b in hit.blocks)

    def adopt_prefix(self, seq: Sequence, hit: PrefixHit) -> None:
        """Starts ``seq``'s table with the prefix-hit blocks (one more reference each)."""
        self.pool.acquire(hit.blocks)
        self._tables[seq.seq_id] = list(hit.blocks)
        seq.num_hashed_blocks = hit.num_blocks

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Indexes the blocks that ``seq``'s computed tokens have filled since the last call."""
        full = seq.num_computed_tokens // self.block_size
        if full <= seq.num_hashed_blocks or not self.enable_caching:
            return
        hashes = self.block_hashes(seq, seq.num_computed_tokens)
        first, bs = seq.num_hashed_blocks, self.block_size
        self.pool.cache_blocks(self._tables[seq.seq_id][first:full], hashes[first:full],
                               hashes[first - 1] if first else None, seq.token_ids[first * bs : full * bs])
        seq.num_hashed_blocks = full

    # ---- swapping

    def _distinct(self, tables: dict[int, list[KVBlock]], seq_ids: list[int]) -> int:
        return len({id(b) for s in seq_ids for b in tables[s]})

    def num_swap_out_blocks(self, seq_ids: list[int]) -> int:
        return self._distinct(self._tables, seq_ids)

    def num_swap_in_blocks(self, seq_ids: list[int]) -> int:
        return self._distinct(self._cpu_tables, seq_ids)

    def can_swap_out(self, seq_ids: list[int]) -> bool:
        return self.cpu_pool is not None and self.num_swap_out_blocks(seq_ids) <= self.cpu_pool.num_free_blocks

    def swap_out(self, seq_ids: list[int]) -> list[tuple[int, int]]:
        """Moves the sequences' tables to CPU blocks, keeping their sharing; returns (device, cpu) ids."""
        assert self.cpu_pool is not None
        return self._move(self._tables, self.pool, self._cpu_tables, self.cpu_pool, seq_ids)

    def swap_in(self, seq_ids: list[int]) -> list[tuple[int, int]]:
        """Moves the sequences' tables back to device blocks; returns (cpu, device) ids."""
        assert self.cpu_pool is not None
        return self._move(self._cpu_tables, self.cpu_pool, self._tables, self.pool, seq_ids)

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
            src_pool.release_table(src_tables.pop(seq_id))
        return pairs

    # ---- freeing

    def free(self, seq_id: int) -> None:
        """Releases the sequence's blocks, in the order the eviction policy frees a table."""
        table = self._tables.pop(seq_id, None)
        if table:
            self.pool.release_table(table)
        cpu_table = self._cpu_tables.pop(seq_id, None)
        if cpu_table:
            assert self.cpu_pool is not None
            self.cpu_pool.release_table(cpu_table)

    # ---- introspection (tests, debugging)

    def tables(self, cpu: bool = False) -> dict[int, list[int]]:
        """Every block table as block ids: the device tables, or with ``cpu`` the swapped-out ones."""
        return {seq_id: [b.block_id for b in t] for seq_id, t in (self._cpu_tables if cpu else self._tables).items()}

    def check_invariants(self, running: Iterable[Sequence], swapped: Iterable[Sequence]) -> None:
        """Raises AssertionError unless the tables belong to exactly ``running`` (device) and
        ``swapped`` (CPU), each pool's reference counts equal the references its tables hold (and only
        unreferenced blocks are free), every running table covers the computed tokens, and every
        cached block in a table is full of computed tokens (so it is never written again)."""
        running, swapped = list(running), list(swapped)
        if set(self._tables) != {s.seq_id for s in running}:
            raise AssertionError(f"device tables of {sorted(self._tables)}, running {[s.seq_id for s in running]}")
        if set(self._cpu_tables) != {s.seq_id for s in swapped}:
            raise AssertionError(f"CPU tables of {sorted(self._cpu_tables)}, swapped {[s.seq_id for s in swapped]}")
        for pool, tables in ((self.pool, self._tables), (self.cpu_pool, self._cpu_tables)):
            if pool is None:
                if tables:
                    raise AssertionError("CPU tables without a CPU pool")
                continue
            held: dict[int, int] = {}
            for table in tables.values():
                for block in table:
                    held[block.block_id] = held.get(block.block_id, 0) + 1
            pool.check_invariants(held)
        bs = self.block_size
        for seq in running:
            table = self._tables[seq.seq_id]
            if len(table) * bs < seq.num_computed_tokens:
                raise AssertionError(f"sequence {seq.seq_id}: {len(table)} blocks for {seq.num_computed_tokens} tokens")
            for i, block in enumerate(table):
                if block.block_hash is not None and (i + 1) * bs > seq.num_computed_tokens:
                    raise AssertionError(f"sequence {seq.seq_id}: cached {block} at position {i} is not full")
