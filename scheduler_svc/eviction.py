"""The eviction policy: which free KV block is reused next, and in which order a table's blocks are freed.

A free block that still carries a ``block_hash`` is a prefix-cache entry; taking it for new data evicts
that entry. So the order in which free blocks are reused *is* the prefix cache's eviction policy. It
lives here, whole, and reaches the block pool as an object (``BlockPool(..., eviction=...)``): changing
the policy is this file and its test (tests/scheduler_svc/test_eviction.py): a class with the
``EvictionPolicy`` methods, returned by ``new_policy``.

The policy below (vLLM's): least recently freed first, and a table's tail before its prefix. Freed
blocks join the tail of a doubly linked list and blocks are taken from its head; a table is freed in
reverse, so its last blocks (likelier unique to one request) are reused before its first ones
(likelier shared with other prompts). A block revived by a prefix hit leaves the middle of the list in
O(1).

The policy only orders blocks; the pool decides when a block is free (``ref_cnt == 0``). It reads and
writes nothing of a block but its ``prev_free`` / ``next_free`` links, so it needs no import of the pool.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol


class FreeListNode(Protocol):
    """What the policy needs of a block: an id (for debugging) and two links, None while not free."""

    block_id: int
    prev_free: Any
    next_free: Any


class EvictionPolicy(Protocol):
    """What the block pool asks of a policy."""

    @property
    def num_free(self) -> int: ...

    def free_order(self, table: Sequence[Any]) -> Iterable[Any]: ...  # the order a table's blocks are released in
    def push(self, block: Any) -> None: ...  # the block became free
    def pop(self) -> Any: ...  # the free block to reuse next
    def remove(self, block: Any) -> None: ...  # a free block is referenced again
    def block_ids(self) -> list[int]: ...  # free block ids, the next one first


class _Sentinel:
    __slots__ = ("block_id", "prev_free", "next_free")

    def __init__(self) -> None:
        self.block_id = -1
        self.prev_free: Any = None
        self.next_free: Any = None


class FreeBlockQueue:
    """Doubly linked list of free blocks with O(1) append, pop from the head and removal anywhere."""

    def __init__(self) -> None:
        # Sentinels keep every real node's neighbours non-None while it is queued.
        self._head = _Sentinel()
        self._tail = _Sentinel()
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free = 0

    def append(self, block: FreeListNode) -> None:
        last = self._tail.prev_free
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self.num_free += 1

    def popleft(self) -> FreeListNode:
        block = self._head.next_free
        if block is self._tail:
            raise IndexError("no free blocks")
        self.remove(block)
        return block

    def remove(self, block: FreeListNode) -> None:
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise ValueError(f"block {block.block_id} is not in the free list")
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self.num_free -= 1

    def block_ids(self) -> list[int]:
        ids = []
        node = self._head.next_free
        while node is not self._tail:
            ids.append(node.block_id)
            node = node.next_free
        return ids


class LRUEviction:
    """Least recently freed first; a table's tail before its prefix."""

    def __init__(self) -> None:
        self._queue = FreeBlockQueue()

    @property
    def num_free(self) -> int:
        return self._queue.num_free

    def free_order(self, table: Sequence[FreeListNode]) -> Iterable[FreeListNode]:
        """The order in which a table's blocks are released: tail first."""
        return reversed(table)

    def push(self, block: FreeListNode) -> None:
        """``block`` became free (its last reference went): it is reused after every block freed before."""
        self._queue.append(block)

    def pop(self) -> FreeListNode:
        """The free block to reuse next (raises IndexError when none is free)."""
        return self._queue.popleft()

    def remove(self, block: FreeListNode) -> None:
        """A free block is referenced again (prefix hit, fork): it leaves the order."""
        self._queue.remove(block)

    def block_ids(self) -> list[int]:
        """Free block ids in reuse order, the next one first (for tests and debugging)."""
        return self._queue.block_ids()


def new_policy() -> EvictionPolicy:
    """The policy a block pool uses unless given one."""
    return LRUEviction()
