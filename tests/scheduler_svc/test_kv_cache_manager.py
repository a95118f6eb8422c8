import pytest

from scheduler_svc.block_pool import BlockPool
from scheduler_svc.kv_cache_manager import KVCacheManager


def make(num_blocks=8, block_size=4):
    return KVCacheManager(BlockPool(num_blocks), block_size)


def test_allocate_grows_table_by_whole_blocks():
    kv = make()
    assert kv.allocate(seq_id=10, num_tokens=5) == [0, 1]
    assert kv.allocate(10, 8) == []  # 8 tokens still fit two blocks of 4
    assert kv.allocate(10, 9) == [2]
    assert kv.block_ids(10) == [0, 1, 2]
    assert kv.num_free_blocks == 5
    assert [kv.pool.blocks[i].ref_cnt for i in range(4)] == [1, 1, 1, 0]


def test_can_allocate_matches_allocate():
    kv = make(num_blocks=3, block_size=2)
    assert kv.can_allocate(1, 6)
    assert not kv.can_allocate(1, 7)
    with pytest.raises(ValueError, match="needs 4 blocks, 3 free"):
        kv.allocate(1, 7)
    assert kv.num_free_blocks == 3 and not kv.has(1)


def test_free_releases_tail_first():
    kv = make(num_blocks=6, block_size=1)
    kv.allocate(1, 3)  # 0 1 2
    kv.allocate(2, 2)  # 3 4
    kv.free(1)
    assert kv.pool.free_queue.block_ids() == [5, 2, 1, 0]
    assert not kv.has(1) and kv.block_ids(2) == [3, 4]
    kv.free(1)  # freeing an unknown sequence is a no-op
    assert kv.num_free_blocks == 4
