"""Randomized invariant check: admissions (plain, n > 1, beam search), steps (allocate / append, forks,
copy-on-write, prefix hits, evictions), steps planned ahead of the previous step's results (async
scheduling), aborts (free), recompute and swap preemptions in any order keep
the block accounting exact, the workers' state (run by the real plan application) equal to the
scheduler's, every computed KV slot holding its token, and nothing leaks once every request has
ended."""

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gpu_worker.sampling_params import InvalidField
from tests.scheduler_svc.factories import (
    ToyWorker,
    check_invariants,
    params,
    run_step,
    sampled_for,
    scheduler,
)

EOS = 99
BASES = ([*range(1, 20)], [*range(1, 7), *range(40, 53)])  # shared prefixes, so prefix hits happen


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(num_cpu_blocks=st.sampled_from([0, 6, 20]), caching=st.booleans(),
                block_size=st.sampled_from([1, 2, 4]))
    def setup(self, num_cpu_blocks, caching, block_size):
        # A small pool so that preemption (recompute and swap) and eviction happen often.
        self.s = scheduler(num_blocks=28 // block_size, block_size=block_size, max_num_seqs=6, budget=10,
                           max_model_len=24, eos=(EOS,), num_cpu_blocks=num_cpu_blocks * 2 // block_size,
                           prefix_caching=caching)
        self.w = ToyWorker(self.s)
        self.next_id = 0
        self.live: set[tuple[int, str]] = set()

    @rule(prompt_len=st.integers(1, 14), max_tokens=st.integers(1, 10), stream=st.integers(0, 1),
          base=st.sampled_from(BASES), group=st.sampled_from([("n", 1), ("n", 2), ("n", 3), ("beam_width", 2),
                                                              ("beam_width", 3)]))
    def add(self, prompt_len, max_tokens, stream, base, group):
        rid = f"r{self.next_id}"
        self.next_id += 1
        try:
            self.s.add_request(stream, rid, base[:prompt_len], params(max_tokens=max_tokens, **dict([group])))
        except InvalidField:
            return  # cannot fit the pool: rejected, nothing allocated
        self.live.add((stream, rid))

    @precondition(lambda self: self.s.has_work())
    @rule(eos_every=st.integers(2, 12), data=st.data())
    def step(self, eos_every, data):
        out = self.s.schedule()
        sampled, top = self.w.run(out, self.s)
        for seq_id in sampled:
            if data.draw(st.integers(0, eos_every)) == 0:
                self._force_eos(seq_id, sampled, top)
        for o in self.s.update(out, sampled, top=top):
            if o.finish_reason:
                self._maybe_done(o.seq.request)

    @precondition(lambda self: self.s.has_work())
    @rule(eos_every=st.integers(2, 12), abort_between=st.booleans(), data=st.data())
    def step_with_next_planned_ahead(self, eos_every, abort_between, data):
        """A step, then the next one planned ahead and run before the first step's results are applied
        (as EngineCore pipelines decode steps), optionally with an abort in between."""
        out = self.s.schedule()
        sampled, top = self.w.run(out, self.s)
        for seq_id in sampled:
            if data.draw(st.integers(0, eos_every)) == 0:
                self._force_eos(seq_id, sampled, top)
        ahead = self.s.schedule_ahead(out)
        if ahead is not None:
            ahead_result = self.w.run(ahead)  # the workers run it before the scheduler sees `out`'s results
        if abort_between and self.live:
            stream, rid = data.draw(st.sampled_from(sorted(self.live)))
            self.s.abort_request(stream, rid)
            self.live.discard((stream, rid))
        for o in self.s.update(out, sampled, top=top):
            if o.finish_reason:
                self._maybe_done(o.seq.request)
        if ahead is not None:
            for o in self.s.update(ahead, *ahead_result[:1], top=ahead_result[1]):
                if o.finish_reason:
                    self._maybe_done(o.seq.request)

    def _force_eos(self, seq_id, sampled, top):
        """The worker samples EOS instead (and, for beams, EOS becomes the best candidate)."""
        sampled[seq_id] = EOS
        self.w.runner.seqs[seq_id].token_ids[-1] = EOS
        ids, _ = top[seq_id]
        if ids and EOS not in ids:
            ids[0] = EOS

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def abort(self, data):
        stream, rid = data.draw(st.sampled_from(sorted(self.live)))
        self.s.abort_request(stream, rid)
        self.live.discard((stream, rid))

    @precondition(lambda self: self.live)
    @rule(stream=st.integers(0, 1))
    def drop_stream(self, stream):
        self.s.abort_stream(stream)
        self.live = {k for k in self.live if k[0] != stream}

    def _maybe_done(self, request):
        if (request.stream_id, request.request_id) not in self.s.requests:
            self.live.discard((request.stream_id, request.request_id))

    @invariant()
    def blocks_accounted(self):
        if hasattr(self, "s"):
            check_invariants(self.s)

    def teardown(self):
        if not hasattr(self, "s"):
            return
        for _ in range(500):
            if not self.s.has_work():
                break
            run_step(self.s, self.w)
            check_invariants(self.s)
        assert not self.s.has_work() and self.s.requests == {}
        self.w.run(self.s.schedule(), self.s)  # delivers the last drops
        assert self.w.runner.seqs == {}
        for pool in (self.s.pool, self.s.cpu_pool):
            if pool is not None:
                assert pool.num_free_blocks == pool.num_blocks
                assert all(b.ref_cnt == 0 for b in pool.blocks)


SchedulerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestScheduler = SchedulerMachine.TestCase
# 150 random programs of 60 steps: 3-12 s, so out of `make test-fast` (a mark on the generated class).
TestScheduler = pytest.mark.slow(TestScheduler)


def test_machine_reaches_preemption():
    """The machine's pool is small enough that preemption is exercised, not only possible."""
    s = scheduler(num_blocks=12, block_size=2, max_num_seqs=4, budget=10, max_model_len=24)
    for i in range(4):
        s.add_request(0, f"r{i}", [1, 2, 3, 4, 5], params(max_tokens=10))
    while s.has_work():
        out = s.schedule()
        s.update(out, sampled_for(out))
        check_invariants(s)
    assert s.stats.num_preemptions > 0


def test_machine_reaches_fork_cow_prefix_hits_eviction_and_swap():
    """The sharing paths the machine explores are reachable at its sizes: forks with copy-on-write,
    prefix hits, evictions of cached blocks, swap-out and swap-in."""
    s = scheduler(num_blocks=14, block_size=2, max_num_seqs=6, budget=10, max_model_len=24, eos=(EOS,),
                  num_cpu_blocks=10)
    w = ToyWorker(s)
    s.add_request(0, "beams", BASES[0][:5], params(max_tokens=8, beam_width=2, ignore_eos=True))
    s.add_request(0, "samples", BASES[0][:7], params(max_tokens=8, n=2, ignore_eos=True))
    s.add_request(0, "late", BASES[1][:9], params(max_tokens=6, ignore_eos=True))
    while s.has_work():
        run_step(s, w)
        check_invariants(s)
    s.add_request(0, "again", BASES[1][:9], params(max_tokens=2))
    while s.has_work():
        run_step(s, w)
        check_invariants(s)
    assert w.num_copies > 0 and s.stats.num_swap_preemptions > 0 and w.num_swapped_blocks > 0
    assert s.stats.num_cached_prompt_tokens > 0 and s.pool.num_evictions > 0
