"""Randomized invariant check: admissions, steps (allocate / append), aborts (free) and preemptions in
any order keep the block accounting exact, and nothing leaks once every request has ended."""

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from scheduler_svc.sampling_params import InvalidField
from tests.scheduler_svc.factories import check_invariants, params, sampled_for, scheduler

EOS = 99


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # A small pool so that recompute preemption happens often.
        self.s = scheduler(num_blocks=12, block_size=2, max_num_seqs=4, budget=10, max_model_len=24, eos=(EOS,))
        self.next_id = 0
        self.live: set[str] = set()

    @rule(prompt_len=st.integers(1, 14), max_tokens=st.integers(1, 10), stream=st.integers(0, 1))
    def add(self, prompt_len, max_tokens, stream):
        rid = f"r{self.next_id}"
        self.next_id += 1
        try:
            self.s.add_request(stream, rid, list(range(1, prompt_len + 1)), params(max_tokens=max_tokens))
        except InvalidField:
            return  # cannot fit the pool: rejected, nothing allocated
        self.live.add((stream, rid))

    @precondition(lambda self: self.s.has_work())
    @rule(eos_every=st.integers(2, 12), data=st.data())
    def step(self, eos_every, data):
        out = self.s.schedule()
        sampled = sampled_for(out, token=5)
        for seq_id in sampled:
            if data.draw(st.integers(0, eos_every)) == 0:
                sampled[seq_id] = EOS
        for o in self.s.update(out, sampled):
            if o.finish_reason:
                self._maybe_done(o.seq.request)

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
        check_invariants(self.s)

    def teardown(self):
        for _ in range(500):
            if not self.s.has_work():
                break
            out = self.s.schedule()
            self.s.update(out, sampled_for(out))
            check_invariants(self.s)
        assert not self.s.has_work() and self.s.requests == {}
        assert self.s.pool.num_free_blocks == self.s.pool.num_blocks
        assert all(b.ref_cnt == 0 for b in self.s.pool.blocks)


SchedulerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestScheduler = SchedulerMachine.TestCase


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
