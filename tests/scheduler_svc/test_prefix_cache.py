"""Automatic prefix caching: full blocks indexed by the hash of their tokens and every token before
them; admission reuses the longest cached prefix (never the whole prompt); freed blocks stay cached
and are evicted least recently freed first, tails before prefixes. Exact ids and counts."""

from scheduler_svc.block_hash import hash_block
from tests.scheduler_svc.factories import (
    ToyWorker,
    check_invariants,
    params,
    run_step,
    sampled_for,
    scheduler,
    step,
)

PROMPT = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]  # block size 4: two full blocks, then 2 tokens


def finish_all(s):
    while s.has_work():
        step(s)


def test_second_identical_request_computes_only_what_was_not_cached():
    s = scheduler(num_blocks=16, block_size=4)
    s.add_request(0, "a", PROMPT, params(max_tokens=2))
    out, _ = step(s)
    assert out.new_seqs[0].block_table == [0, 1, 2] and s.stats.num_computed_prompt_tokens == 10
    assert s.pool.blocks[0].block_hash == hash_block(None, [1, 2, 3, 4])
    assert s.pool.blocks[1].block_hash == hash_block(hash_block(None, [1, 2, 3, 4]), [5, 6, 7, 8])
    assert s.pool.blocks[2].block_hash is None  # partial blocks are never cached
    request = s.add_request(0, "b", PROMPT, params(max_tokens=2))
    out = s.schedule()
    (new,) = out.new_seqs
    assert new.seq.num_computed_tokens == 8 and new.num_scheduled_tokens == 2
    assert new.block_table == [0, 1, 3]  # shares the two cached blocks while both run
    assert [b.ref_cnt for b in s.pool.blocks[:4]] == [2, 2, 1, 1]
    assert request.num_cached_tokens == 8
    s.update(out, sampled_for(out))
    assert s.stats.num_computed_prompt_tokens == 12 and s.stats.num_cached_prompt_tokens == 8
    check_invariants(s)


def test_a_fully_cached_prompt_still_computes_its_last_block():
    s = scheduler(num_blocks=16, block_size=4)
    s.add_request(0, "a", PROMPT[:8], params(max_tokens=1))
    finish_all(s)
    assert s.pool.lookup(s.pool.blocks[1].block_hash) is s.pool.blocks[1]  # both blocks cached
    request = s.add_request(0, "b", PROMPT[:8], params(max_tokens=1))
    out = s.schedule()
    # The last prompt token must be computed (it samples), and a cached block is never written:
    # the hit stops at the first block and the second is computed into a fresh block.
    assert (out.new_seqs[0].num_scheduled_tokens, request.num_cached_tokens) == (4, 4)
    assert out.new_seqs[0].block_table == [0, 2]


def test_freed_blocks_stay_cached_until_reused_lru_tails_first():
    s = scheduler(num_blocks=6, block_size=4)
    s.add_request(0, "a", PROMPT, params(max_tokens=2))  # blocks 0 1 2 (2 is the partial tail)
    finish_all(s)
    assert s.pool.free_block_ids() == [3, 4, 5, 2, 1, 0]  # freed tail first
    assert len(s.pool.cached_blocks) == 2  # 11 tokens computed (not the last sampled): two full blocks
    s.add_request(0, "c", [50, 51, 52, 53, 54], params(max_tokens=1))
    out, _ = step(s)
    assert out.new_seqs[0].block_table == [3, 4]  # never-used blocks first
    assert s.pool.free_block_ids() == [5, 2, 1, 0, 4, 3]
    s.add_request(0, "d", [60, 61, 62, 63, 64], params(max_tokens=1))
    out, _ = step(s)
    assert out.new_seqs[0].block_table == [5, 2] and s.pool.num_evictions == 0  # a's uncached tail went first
    request = s.add_request(0, "e", PROMPT, params(max_tokens=1))  # a's prefix blocks 0 and 1 survived
    out, _ = step(s)
    assert request.num_cached_tokens == 8 and out.new_seqs[0].block_table == [0, 1, 4]
    s.add_request(0, "f", [70, 71, 72, 73, 74], params(max_tokens=1))
    out, _ = step(s)
    # Least recently freed first: c's cached prefix block 3 goes before d's (block 5).
    assert out.new_seqs[0].block_table == [3, 2] and s.pool.num_evictions == 1
    assert s.pool.blocks[5].block_hash is not None


def test_prefix_caching_can_be_switched_off():
    s = scheduler(num_blocks=16, block_size=4, prefix_caching=False)
    s.add_request(0, "a", PROMPT, params(max_tokens=2))
    finish_all(s)
    request = s.add_request(0, "b", PROMPT, params(max_tokens=2))
    finish_all(s)
    assert request.num_cached_tokens == 0 and s.stats.num_computed_prompt_tokens == 20
    assert s.pool.cached_blocks == {} and all(b.block_hash is None for b in s.pool.blocks)


def test_recompute_after_preemption_reuses_its_own_cached_blocks():
    s = scheduler(num_blocks=6, block_size=2, max_model_len=64)
    s.add_request(0, "a", [1, 2, 3], params(max_tokens=6, ignore_eos=True))
    s.add_request(0, "b", [4, 5, 6, 7, 8], params(max_tokens=3, ignore_eos=True))
    while not s.stats.num_preemptions:
        step(s)
    cached_before = s.stats.num_cached_prompt_tokens
    finish_all(s)
    assert s.stats.num_cached_prompt_tokens > cached_before  # b came back through the cache


def test_hits_carry_the_right_kv_through_the_workers():
    """With the toy worker, a request admitted on cached blocks reads exactly its tokens there."""
    s = scheduler(num_blocks=16, block_size=2)
    w = ToyWorker(s)
    requests = [
        ("a", PROMPT, params(max_tokens=3)),
        ("b", PROMPT[:7] + [70, 71], params(max_tokens=3, n=2)),  # hits [1 2] [3 4] [5 6]
        ("c", PROMPT[:9], params(max_tokens=3, beam_width=2)),  # hits [1 2] [3 4] [5 6] [7 8]
    ]
    for request_id, prompt, p in requests:
        s.add_request(0, request_id, prompt, p)
        while s.has_work():
            run_step(s, w)  # ToyWorker.run checks every computed slot against the tokens
            check_invariants(s)
    assert s.stats.num_cached_prompt_tokens == 6 + 8


def test_the_scheduler_flag_switches_caching_off():
    from scheduler_svc.service import build_parser, config_from_args

    assert config_from_args(build_parser().parse_args([])).enable_prefix_caching
    assert not config_from_args(build_parser().parse_args(["--no-prefix-caching"])).enable_prefix_caching
