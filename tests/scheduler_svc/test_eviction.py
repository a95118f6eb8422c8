"""The eviction policy on its own: the order in which free blocks are reused and tables are freed."""

import pytest

from scheduler_svc.block_pool import KVBlock
from scheduler_svc.eviction import LRUEviction


def blocks(n):
    return [KVBlock(i) for i in range(n)]


def test_least_recently_freed_is_reused_first():
    policy = LRUEviction()
    b = blocks(4)
    for block in (b[2], b[0], b[3], b[1]):
        policy.push(block)
    assert policy.block_ids() == [2, 0, 3, 1] and policy.num_free == 4
    assert [policy.pop().block_id for _ in range(4)] == [2, 0, 3, 1]
    with pytest.raises(IndexError):
        policy.pop()


def test_a_table_is_freed_tail_first():
    policy = LRUEviction()
    table = blocks(3)
    for block in policy.free_order(table):
        policy.push(block)
    assert policy.block_ids() == [2, 1, 0]  # the tail is evicted before the shared prefix


def test_remove_takes_a_block_from_the_middle_in_place():
    policy = LRUEviction()
    b = blocks(3)
    for block in b:
        policy.push(block)
    policy.remove(b[1])
    assert policy.block_ids() == [0, 2] and policy.num_free == 2
    assert b[1].prev_free is None and b[1].next_free is None
    with pytest.raises(ValueError, match="not in the free list"):
        policy.remove(b[1])
    policy.push(b[1])
    assert policy.block_ids() == [0, 2, 1]


def test_a_pool_without_a_policy_gets_new_policys():
    from scheduler_svc.block_pool import BlockPool
    from scheduler_svc.eviction import new_policy

    pool = BlockPool(3)
    assert type(pool.eviction) is type(new_policy())
    pool.release_table(pool.allocate(3))
    assert pool.free_block_ids() == [2, 1, 0]
