import pytest

from scheduler_svc.block_pool import BlockPool
from scheduler_svc.eviction import LRUEviction


def test_allocate_takes_lowest_ids_first_with_ref_cnt_one():
    pool = BlockPool(6)
    blocks = pool.allocate(3)
    assert [b.block_id for b in blocks] == [0, 1, 2]
    assert [b.ref_cnt for b in blocks] == [1, 1, 1]
    assert pool.num_free_blocks == 3
    assert pool.free_block_ids() == [3, 4, 5]


def test_release_follows_the_given_order_and_release_table_the_policys():
    pool = BlockPool(6)
    a = pool.allocate(3)  # 0 1 2
    pool.release(a[:2])  # in the order given: 0 then 1
    assert pool.free_block_ids() == [3, 4, 5, 0, 1]
    pool.release_table(a[2:])
    b = pool.allocate(3)  # 3 4 5
    pool.release_table(b)  # the policy's table order (LRU: tail first)
    assert pool.free_block_ids() == [0, 1, 2, 5, 4, 3]


def test_a_policy_passed_in_decides_the_order():
    class MostRecentFirst(LRUEviction):  # a stand-in policy: reuse the block freed last
        def pop(self):
            block = self._queue._tail.prev_free
            self._queue.remove(block)
            return block

    pool = BlockPool(4, eviction=MostRecentFirst())
    a = pool.allocate(2)  # 3 2: the last pushed goes first
    assert [b.block_id for b in a] == [3, 2]
    pool.release([a[1]])
    assert [b.block_id for b in pool.allocate(1)] == [2]


def test_cache_blocks_indexes_new_hashes_first_writer_wins():
    pool = BlockPool(4, enable_caching=True)
    b0, b1, b2 = pool.allocate(3)
    pool.cache_blocks([b0, b1], [10, 11])
    pool.cache_blocks([b2], [11])  # 11 is b1's already
    assert pool.lookup(11) is b1 and b2.block_hash is None
    uncached = BlockPool(2)
    (c,) = uncached.allocate(1)
    uncached.cache_blocks([c], [5])
    assert c.block_hash is None and uncached.lookup(5) is None


def test_acquire_shares_and_removes_cached_from_middle_of_free_list():
    pool = BlockPool(4, enable_caching=True)
    b0, b1 = pool.allocate(2)
    pool.cache_blocks([b1], [1234])
    pool.release([b1])
    assert b1.ref_cnt == 0 and pool.free_block_ids() == [2, 3, 1]
    assert pool.lookup(1234) is b1
    pool.acquire([b1])  # a prefix hit revives it from the middle... here the tail
    assert b1.ref_cnt == 1 and pool.free_block_ids() == [2, 3]
    pool.acquire([b0])
    assert b0.ref_cnt == 2
    pool.release([b0])
    assert b0.ref_cnt == 1 and 0 not in pool.free_block_ids()


def test_reusing_a_cached_block_evicts_its_hash():
    pool = BlockPool(2, enable_caching=True)
    (b0,) = pool.allocate(1)
    pool.cache_blocks([b0], [7])
    pool.release([b0])
    pool.allocate(2)  # takes block 1, then block 0 (evicted)
    assert pool.lookup(7) is None and b0.block_hash is None
    assert pool.num_evictions == 1


def test_over_allocation_and_double_release_raise():
    pool = BlockPool(2)
    with pytest.raises(ValueError, match="asked for 3 blocks, 2 free"):
        pool.allocate(3)
    (b,) = pool.allocate(1)
    pool.release([b])
    with pytest.raises(ValueError, match="ref_cnt 0"):
        pool.release([b])
    with pytest.raises(ValueError):
        BlockPool(0)
