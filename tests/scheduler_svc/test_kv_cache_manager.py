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


def test_fork_shares_every_block_and_a_write_copies_the_shared_one():
    kv = make(num_blocks=8, block_size=4)
    kv.allocate(1, 6)  # blocks 0 1; block 1 holds positions 4 5
    kv.fork(1, 2)
    assert kv.block_ids(2) == [0, 1] and [kv.pool.blocks[i].ref_cnt for i in range(3)] == [2, 2, 0]
    assert kv.num_blocks_needed([(1, 6, 7), (2, 6, 7)]) == 1  # the first writer copies, the last keeps it
    assert kv.allocate_slots(1, 6, 7) == ([], [(1, 2)], [(1, 2)])
    assert kv.allocate_slots(2, 6, 7) == ([], [], [])  # no longer shared: written in place
    assert kv.block_ids(1) == [0, 2] and kv.block_ids(2) == [0, 1]
    assert kv.allocate_slots(2, 7, 9) == ([3], [], [])  # growth past the table: a new block
    assert [kv.pool.blocks[i].ref_cnt for i in range(4)] == [2, 1, 1, 1]


def test_writes_into_a_block_shared_with_a_non_writer_always_copy():
    kv = make(num_blocks=8, block_size=4)
    kv.allocate(1, 2)
    kv.fork(1, 2)
    kv.fork(1, 3)
    assert kv.num_blocks_needed([(1, 2, 3), (2, 2, 3)]) == 2  # sequence 3 still reads block 0
    kv.allocate_slots(1, 2, 3)
    kv.allocate_slots(2, 2, 3)
    assert [kv.block_ids(s) for s in (1, 2, 3)] == [[1], [2], [0]]


def test_swap_out_and_in_keep_the_sharing_and_count_cpu_references_apart():
    kv = KVCacheManager(BlockPool(8), 4, cpu_pool=BlockPool(4))
    kv.allocate(1, 8)  # 0 1
    kv.fork(1, 2)
    kv.allocate_slots(2, 8, 9)  # 2 gets block 2
    assert kv.num_swap_out_blocks([1, 2]) == 3 and kv.can_swap_out([1, 2])
    assert kv.swap_out([1, 2]) == [(0, 0), (1, 1), (2, 2)]
    assert kv.block_tables == {} and kv.num_free_blocks == 8
    assert [[b.block_id for b in kv.cpu_tables[s]] for s in (1, 2)] == [[0, 1], [0, 1, 2]]
    assert [b.ref_cnt for b in kv.cpu_pool.blocks] == [2, 2, 1, 0]
    assert kv.num_blocks_needed([(1, 8, 9), (2, 9, 10)], cpu=True) == 1  # 1 grows; 2 writes its own block
    kv.allocate(3, 4)  # takes device block 3, the head of the free list
    assert kv.swap_in([1, 2]) == [(0, 4), (1, 5), (2, 6)]
    assert kv.block_ids(1) == [4, 5] and kv.block_ids(2) == [4, 5, 6] and kv.cpu_tables == {}
    assert kv.cpu_pool.num_free_blocks == 4 and [kv.pool.blocks[i].ref_cnt for i in (4, 5, 6)] == [2, 2, 1]
