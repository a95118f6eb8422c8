import pytest

from scheduler_svc.block_pool import BlockPool
from scheduler_svc.kv_cache_manager import KVCacheManager, SlotAllocation


def make(num_blocks=8, block_size=4):
    return KVCacheManager(BlockPool(num_blocks), block_size)


def refs(pool, n):
    return [pool.blocks[i].ref_cnt for i in range(n)]


def test_allocate_slots_grows_table_by_whole_blocks():
    kv = make()
    assert kv.allocate_slots(10, 0, 5) == SlotAllocation([0, 1], [], None)
    assert kv.allocate_slots(10, 5, 8) == SlotAllocation([], [], None)  # 8 tokens still fit two blocks of 4
    assert kv.allocate_slots(10, 8, 9) == SlotAllocation([2], [], None)
    assert kv.block_table(10) == [0, 1, 2]
    assert kv.num_free_blocks == 5
    assert refs(kv.pool, 4) == [1, 1, 1, 0]


def test_blocks_to_write_match_allocate_slots_which_takes_nothing_when_short():
    kv = make(num_blocks=3, block_size=2)
    assert kv.num_blocks_to_write(1, 0, 6) == kv.num_blocks_needed([(1, 0, 6)]) == 3
    assert kv.num_blocks_to_write(1, 0, 7) == kv.num_blocks_needed([(1, 0, 7)]) == 4
    with pytest.raises(ValueError, match="asked for 4 blocks, 3 free"):
        kv.allocate_slots(1, 0, 7)
    assert kv.num_free_blocks == 3 and kv.tables() == {}


def test_free_releases_tail_first():
    kv = make(num_blocks=6, block_size=1)
    kv.allocate_slots(1, 0, 3)  # 0 1 2
    kv.allocate_slots(2, 0, 2)  # 3 4
    kv.free(1)
    assert kv.pool.free_block_ids() == [5, 2, 1, 0]
    assert kv.tables() == {2: [3, 4]}
    kv.free(1)  # freeing an unknown sequence is a no-op
    assert kv.num_free_blocks == 4


def test_fork_shares_every_block_and_a_write_copies_the_shared_one():
    kv = make(num_blocks=8, block_size=4)
    kv.allocate_slots(1, 0, 6)  # blocks 0 1; block 1 holds positions 4 5
    kv.fork(1, 2)
    assert kv.block_table(2) == [0, 1] and refs(kv.pool, 3) == [2, 2, 0]
    assert kv.num_blocks_needed([(1, 6, 7), (2, 6, 7)]) == 1  # the first writer copies, the last keeps it
    assert kv.num_blocks_to_write(1, 6, 7) == 1  # alone, a writer into a shared block copies it
    assert kv.allocate_slots(1, 6, 7) == SlotAllocation([], [(1, 2)], (1, [1], [2]))
    assert kv.num_blocks_to_write(2, 6, 7) == 0
    assert kv.allocate_slots(2, 6, 7) == SlotAllocation([], [], None)  # no longer shared: written in place
    assert kv.block_table(1) == [0, 2] and kv.block_table(2) == [0, 1]
    assert kv.allocate_slots(2, 7, 9) == SlotAllocation([3], [], None)  # growth past the table: a new block
    assert refs(kv.pool, 4) == [2, 1, 1, 1]


def test_blocks_to_fork_count_what_the_forks_then_take():
    kv = make(num_blocks=8, block_size=4)
    kv.allocate_slots(1, 0, 6)  # blocks 0 1
    assert kv.num_blocks_to_fork(1, 8, 3) == 3  # slot 8 starts a block: one new block each
    assert kv.num_blocks_to_fork(1, 6, 3) == 2  # slot 6 is in block 1: two copies, the last writer keeps it
    kv.fork(1, 2)
    kv.fork(1, 3)
    assert kv.num_blocks_needed([(s, 6, 7) for s in (1, 2, 3)]) == 2
    allocs = [kv.allocate_slots(s, 6, 7) for s in (1, 2, 3)]
    assert [a.copies for a in allocs] == [[(1, 2)], [(1, 3)], []]
    assert kv.num_free_blocks == 8 - 2 - 2 and refs(kv.pool, 4) == [3, 1, 1, 1]


def test_writes_into_a_block_shared_with_a_non_writer_always_copy():
    kv = make(num_blocks=8, block_size=4)
    kv.allocate_slots(1, 0, 2)
    kv.fork(1, 2)
    kv.fork(1, 3)
    assert kv.num_blocks_needed([(1, 2, 3), (2, 2, 3)]) == 2  # sequence 3 still reads block 0
    kv.allocate_slots(1, 2, 3)
    kv.allocate_slots(2, 2, 3)
    assert [kv.block_table(s) for s in (1, 2, 3)] == [[1], [2], [0]]


def test_swap_out_and_in_keep_the_sharing_and_count_cpu_references_apart():
    kv = KVCacheManager(BlockPool(8), 4, cpu_pool=BlockPool(4))
    kv.allocate_slots(1, 0, 8)  # 0 1
    kv.fork(1, 2)
    kv.allocate_slots(2, 8, 9)  # 2 gets block 2
    assert kv.num_swap_out_blocks([1, 2]) == 3 and kv.can_swap_out([1, 2])
    assert kv.swap_out([1, 2]) == [(0, 0), (1, 1), (2, 2)]
    assert kv.tables() == {} and kv.num_free_blocks == 8
    assert kv.tables(cpu=True) == {1: [0, 1], 2: [0, 1, 2]}
    assert [b.ref_cnt for b in kv.cpu_pool.blocks] == [2, 2, 1, 0]
    assert kv.num_blocks_needed([(1, 8, 9), (2, 9, 10)], cpu=True) == 1  # 1 grows; 2 writes its own block
    kv.allocate_slots(3, 0, 4)  # takes device block 3, the head of the free list
    assert kv.swap_in([1, 2]) == [(0, 4), (1, 5), (2, 6)]
    assert kv.block_table(1) == [4, 5] and kv.block_table(2) == [4, 5, 6] and kv.tables(cpu=True) == {}
    assert kv.cpu_pool.num_free_blocks == 4 and refs(kv.pool, 7)[4:] == [2, 2, 1]
