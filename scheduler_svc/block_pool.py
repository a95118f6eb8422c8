"""Physical KV blocks: records, the free list and reference counts.

The pool knows nothing about requests. It is the only code that changes ``ref_cnt``.

Invariants:
- ``ref_cnt == 0`` means no block table holds the block; such a block is free (in the eviction
  policy's order), and ``ref_cnt > 0`` means it is not.
- Which free block is taken next, and in which order a table's blocks are released, is the eviction
  policy's (scheduler_svc.eviction, passed in): the pool asks it and never orders blocks itself.
- A block with a ``block_hash`` holds a full block of known tokens; while free it stays findable
  through the hash map (automatic prefix caching) until it is taken for new data.
- Where a block is indexed under a hash or loses it, and only there, the pool records a KV-cache event
  when given a log (scheduler_svc.kv_events).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from scheduler_svc.eviction import EvictionPolicy, new_policy
from scheduler_svc.kv_events import KVEventLog


@dataclass(slots=True, eq=False)
class KVBlock:
    """One physical block; the record lives as long as the pool."""

    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None
    # Neighbours in the eviction policy's free list; both None while the block is not free.
    prev_free: KVBlock | None = None
    next_free: KVBlock | None = None


class BlockPool:
    """All physical blocks, preallocated as records at start."""

    def __init__(self, num_blocks: int, enable_caching: bool = False, eviction: EvictionPolicy | None = None,
                 events: KVEventLog | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.eviction = eviction if eviction is not None else new_policy()
        for block in self.blocks:
            self.eviction.push(block)
        # block_hash -> block holding those tokens (full blocks only).
        self.cached_blocks: dict[int, KVBlock] = {}
        self.num_evictions = 0
        self.events = events
        if events is not None:
            events.cleared()  # a fresh pool caches nothing, whatever an earlier process here announced

    @property
    def num_free_blocks(self) -> int:
        return self.eviction.num_free

    def free_block_ids(self) -> list[int]:
        """Free block ids in the order they will be reused (for tests and debugging)."""
        return self.eviction.block_ids()

    def allocate(self, num_blocks: int) -> list[KVBlock]:
        """Takes ``num_blocks`` blocks in the eviction policy's order, each with ref_cnt 1."""
        if num_blocks > self.eviction.num_free:
            raise ValueError(f"asked for {num_blocks} blocks, {self.eviction.num_free} free")
        taken = []
        evicted: list[int] = []
        for _ in range(num_blocks):
            block = self.eviction.pop()
            if block.block_hash is not None:
                # Reusing a cached block for new data evicts its cached contents.
                del self.cached_blocks[block.block_hash]
                evicted.append(block.block_hash)
                block.block_hash = None
            block.ref_cnt = 1
            taken.append(block)
        if evicted:
            self.num_evictions += len(evicted)
            if self.events is not None:
                self.events.removed(evicted)
        return taken

    def acquire(self, blocks: Iterable[KVBlock]) -> None:
        """Adds a reference to blocks that are already held or cached (fork, prefix hit)."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.eviction.remove(block)
            block.ref_cnt += 1

    def release(self, blocks: Iterable[KVBlock]) -> None:
        """Drops one reference from each block, in the order given; blocks reaching 0 become free."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"block {block.block_id} released with ref_cnt {block.ref_cnt}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.eviction.push(block)

    def release_table(self, table: Sequence[KVBlock]) -> None:
        """Drops a whole table's references, in the order the eviction policy frees a table."""
        self.release(self.eviction.free_order(table))

    def lookup(self, block_hash: int) -> KVBlock | None:
        """The block caching ``block_hash``, if any (held or free)."""
        return self.cached_blocks.get(block_hash)

    def cache_blocks(self, blocks: Sequence[KVBlock], block_hashes: Sequence[int], parent_hash: int | None = None,
                     token_ids: Sequence[int] = ()) -> None:
        """Indexes full, held blocks (consecutive in one table) under their chained hashes; the first
        writer of a hash wins. ``parent_hash``: the hash of the block before ``blocks[0]``;
        ``token_ids``: the blocks' tokens (for the stored-blocks event)."""
        if not self.enable_caching:
            return
        run: list[int] = []  # a run of newly indexed blocks, announced in one event
        run_start = 0
        for i, (block, block_hash) in enumerate(zip(blocks, block_hashes, strict=True)):
            if block.block_hash is None and block_hash not in self.cached_blocks:
                block.block_hash = block_hash
                self.cached_blocks[block_hash] = block
                if not run:
                    run_start = i
                run.append(block_hash)
            elif run:
                self._announce(run, block_hashes, run_start, parent_hash, token_ids)
                run = []
        if run:
            self._announce(run, block_hashes, run_start, parent_hash, token_ids)

    def _announce(self, run: list[int], hashes: Sequence[int], start: int, parent_hash: int | None,
                  token_ids: Sequence[int]) -> None:
        if self.events is None:
            return
        bs = self.events.block_size
        parent = hashes[start - 1] if start else parent_hash
        self.events.stored(run, parent, list(token_ids[start * bs : (start + len(run)) * bs]))

    def check_invariants(self, held: dict[int, int]) -> None:
        """Raises AssertionError unless ``held`` (block_id -> references the block tables hold) equals
        every block's ref_cnt, the free list holds exactly the blocks with ref_cnt 0, and the hash map
        indexes exactly the blocks that carry a hash. For tests and debugging."""
        free = self.eviction.block_ids()
        if len(free) != self.eviction.num_free or len(set(free)) != len(free):
            raise AssertionError(f"free list {free} does not match its count {self.eviction.num_free}")
        free_ids = set(free)
        for block in self.blocks:
            if block.ref_cnt != held.get(block.block_id, 0):
                raise AssertionError(f"{block}: block tables hold {held.get(block.block_id, 0)} references")
            if (block.block_id in free_ids) == (block.ref_cnt > 0):
                raise AssertionError(f"{block} is both free and referenced, or neither")
        for block_hash, block in self.cached_blocks.items():
            if block.block_hash != block_hash:
                raise AssertionError(f"{block} indexed under hash {block_hash}")
        if sum(b.block_hash is not None for b in self.blocks) != len(self.cached_blocks):
            raise AssertionError("a block carries a hash that the hash map does not index")
