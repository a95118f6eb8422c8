import pytest

from scheduler_svc.block_pool import BlockPool


def test_allocate_takes_lowest_ids_first_with_ref_cnt_one():
    pool = BlockPool(6)
    blocks = pool.allocate(3)
    assert [b.block_id for b in blocks] == [0, 1, 2]
    assert [b.ref_cnt for b in blocks] == [1, 1, 1]
    assert pool.num_free_blocks == 3
    assert pool.free_queue.block_ids() == [3, 4, 5]


def test_release_appends_to_tail_in_given_order_lru():
    pool = BlockPool(5)
    a = pool.allocate(3)  # 0 1 2
    pool.release(reversed(a))  # tail first: 2 1 0 join the tail
    assert pool.free_queue.block_ids() == [3, 4, 2, 1, 0]
    assert [b.block_id for b in pool.allocate(4)] == [3, 4, 2, 1]


def test_acquire_shares_and_removes_cached_from_middle_of_free_list():
    pool = BlockPool(4, enable_caching=True)
    b0, b1 = pool.allocate(2)
    pool.set_hash(b1, 1234)
    pool.release([b1])
    assert b1.ref_cnt == 0 and pool.free_queue.block_ids() == [2, 3, 1]
    assert pool.lookup(1234) is b1
    pool.acquire([b1])  # a prefix hit revives it from the middle... here the tail
    assert b1.ref_cnt == 1 and pool.free_queue.block_ids() == [2, 3]
    pool.acquire([b0])
    assert b0.ref_cnt == 2
    pool.release([b0])
    assert b0.ref_cnt == 1 and 0 not in pool.free_queue.block_ids()


def test_reusing_a_cached_block_evicts_its_hash():
    pool = BlockPool(2, enable_caching=True)
    (b0,) = pool.allocate(1)
    pool.set_hash(b0, 7)
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
