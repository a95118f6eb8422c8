"""Physical KV blocks: records, the free list and reference counts.

The pool knows nothing about requests. It is the only code that changes ``ref_cnt``.

Invariants:
- ``ref_cnt == 0`` means no block table holds the block; such a block is on the free list, and
  ``ref_cnt > 0`` means it is not.
- The free list is in eviction order: the head is taken first. Freed blocks join the tail, so the
  least recently freed block is reused first (LRU). Callers free a table's blocks in reverse, so a
  sequence's tail blocks are evicted before its prefix, which other requests are likelier to share.
- A block with a ``block_hash`` holds a full block of known tokens; while free it stays findable
  through the hash map (automatic prefix caching) until it is taken for new data.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(slots=True, eq=False)
class KVBlock:
    """One physical block; the record lives as long as the pool."""

    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None
    # Neighbours in the free list; both None when the block is not free (or is the only one).
    prev_free: KVBlock | None = None
    next_free: KVBlock | None = None


class FreeBlockQueue:
    """Doubly linked list of free blocks with O(1) append, pop from the head and removal anywhere."""

    def __init__(self, blocks: list[KVBlock]) -> None:
        # Sentinels keep every real node's neighbours non-None while it is queued.
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free = 0
        for block in blocks:
            self.append(block)

    def append(self, block: KVBlock) -> None:
        last = self._tail.prev_free
        assert last is not None
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self.num_free += 1

    def popleft(self) -> KVBlock:
        block = self._head.next_free
        if block is None or block is self._tail:
            raise IndexError("no free blocks")
        self.remove(block)
        return block

    def remove(self, block: KVBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise ValueError(f"block {block.block_id} is not in the free list")
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self.num_free -= 1

    def block_ids(self) -> list[int]:
        """Free block ids in eviction order (for tests and debugging)."""
        ids = []
        node = self._head.next_free
        while node is not None and node is not self._tail:
            ids.append(node.block_id)
            node = node.next_free
        return ids


class BlockPool:
    """All physical blocks, preallocated as records at start."""

    def __init__(self, num_blocks: int, enable_caching: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        # block_hash -> block holding those tokens (full blocks only).
        self.cached_blocks: dict[int, KVBlock] = {}
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    def allocate(self, num_blocks: int) -> list[KVBlock]:
        """Takes ``num_blocks`` blocks from the head of the free list, each with ref_cnt 1."""
        if num_blocks > self.free_queue.num_free:
            raise ValueError(f"asked for {num_blocks} blocks, {self.free_queue.num_free} free")
        taken = []
        for _ in range(num_blocks):
            block = self.free_queue.popleft()
            if block.block_hash is not None:
                # Reusing a cached block for new data evicts its cached contents.
                del self.cached_blocks[block.block_hash]
                block.block_hash = None
                self.num_evictions += 1
            block.ref_cnt = 1
            taken.append(block)
        return taken

    def acquire(self, blocks: Iterable[KVBlock]) -> None:
        """Adds a reference to blocks that are already held or cached (fork, prefix hit)."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def release(self, blocks: Iterable[KVBlock]) -> None:
        """Drops one reference from each block, in the order given; blocks reaching 0 join the tail."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"block {block.block_id} released with ref_cnt {block.ref_cnt}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is not None and not self.enable_caching:
                    block.block_hash = None
                self.free_queue.append(block)

    def lookup(self, block_hash: int) -> KVBlock | None:
        """The block caching ``block_hash``, if any (held or free)."""
        return self.cached_blocks.get(block_hash)

    def set_hash(self, block: KVBlock, block_hash: int) -> None:
        """Indexes a full, held block under its hash (first writer wins)."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached_blocks:
            return
        block.block_hash = block_hash
        self.cached_blocks[block_hash] = block

    def check_invariants(self, held: dict[int, int]) -> None:
        """Raises AssertionError unless ``held`` (block_id -> references the block tables hold) equals
        every block's ref_cnt, the free list holds exactly the blocks with ref_cnt 0, and the hash map
        indexes exactly the blocks that carry a hash. For tests and debugging."""
        free = self.free_queue.block_ids()
        if len(free) != self.free_queue.num_free or len(set(free)) != len(free):
            raise AssertionError(f"free list {free} does not match its count {self.free_queue.num_free}")
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
