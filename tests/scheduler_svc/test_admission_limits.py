"""What the scheduler refuses before queueing: a request the pool cannot hold names its cause (the
prompt, or max_tokens), and a full waiting queue raises QueueFull, after the request's own checks."""

import pytest

from gpu_worker.sampling_params import InvalidField
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.request import QueueFull
from scheduler_svc.scheduler import Scheduler
from tests.scheduler_svc.factories import check_invariants, params, scheduler


@pytest.mark.parametrize("prompt_len, max_tokens, n, field, needs", [
    (64, 1, 1, "prompt", "needs cache room for 68 tokens to generate a single token"),  # 65 tokens: 17 blocks of 4
    (80, 1, 1, "prompt", "needs cache room for 84 tokens to generate a single token"),
    (40, 40, 1, "max_tokens", "needs cache room for 80 tokens"),  # the prompt alone fits (11 blocks)
    (60, 8, 1, "max_tokens", "needs cache room for 68 tokens"),  # 61 tokens fit 16 blocks; 68 do not
    (60, 1, 4, "prompt", "for 4 sequences (each past the shared prompt) needs cache room for 88 tokens to generate "
     "a single token"),  # 16 + 3 x 2 blocks
])
def test_a_request_the_pool_cannot_hold_names_its_cause(prompt_len, max_tokens, n, field, needs):
    s = scheduler(num_blocks=16, block_size=4, max_model_len=128)  # pool: 64 tokens, less than the context
    with pytest.raises(InvalidField) as err:
        s.add_request(0, "r", [1] * prompt_len, params(max_tokens=max_tokens, n=n, seed=1 if n > 1 else None))
    assert err.value.field == field
    assert needs in str(err.value) and "the server's KV cache holds 64 tokens at once" in str(err.value)
    assert "block" not in str(err.value)  # clients are told tokens, never the memory layout
    assert not s.has_work()


def test_the_waiting_queue_is_bounded():
    config = SchedulerConfig(block_size=4, max_num_seqs=1, max_num_batched_tokens=64, watermark=0.0,
                             max_num_waiting=2)
    s = Scheduler(config, 16, 128, [99], vocab_size=100)
    s.add_request(0, "a", [1, 2], params())  # the engine's one seat is free: "a" is about to run
    s.add_request(0, "b", [3, 4], params())
    s.add_request(0, "c", [5, 6], params())
    with pytest.raises(QueueFull, match=r"2 sequences are waiting for admission \(--max-num-waiting 2\)"):
        s.add_request(0, "d", [7, 8], params())
    with pytest.raises(InvalidField):  # an invalid request is refused as such, full queue or not
        s.add_request(0, "e", [], params())
    assert set(s.requests) == {(0, "a"), (0, "b"), (0, "c")}
    s.schedule()  # admits "a": "b" and "c" still wait for its seat
    with pytest.raises(QueueFull):
        s.add_request(0, "d", [7, 8], params())
    s.abort_request(0, "a")  # the seat is free again: "b" is about to run, only "c" waits
    s.add_request(0, "d", [7, 8], params())
    assert [seq.request.request_id for seq in s.waiting] == ["b", "c", "d"]
    check_invariants(s)


def test_a_burst_at_an_idle_engine_is_not_waiting():
    """Issue 22: --max-num-waiting 8 refused 30 of a burst of 40 with 246 of 256 seats free. What the
    next step admits (free seats and blocks, first come first served) does not count as waiting."""
    config = SchedulerConfig(block_size=4, max_num_seqs=32, max_num_batched_tokens=64, watermark=0.0,
                             max_num_waiting=8)
    s = Scheduler(config, 64, 128, [99], vocab_size=100)
    for i in range(40):  # 32 seats, 2 blocks each: 32 about to run, 8 wait
        s.add_request(0, f"r{i}", [1, 2, 3, 4, 5], params())
    with pytest.raises(QueueFull, match="8 sequences are waiting"):
        s.add_request(0, "r40", [1, 2, 3, 4, 5], params())
    assert s.num_blocked_waiting() == 8


def test_blocks_bound_what_is_about_to_run():
    """Seats are free but the blocks are not: requests beyond the free blocks wait, in arrival order
    (a small request behind a big one waits too, as the scheduler admits first come, first served)."""
    config = SchedulerConfig(block_size=4, max_num_seqs=32, max_num_batched_tokens=64, watermark=0.0,
                             max_num_waiting=2)
    s = Scheduler(config, 16, 128, [99], vocab_size=100)
    s.add_request(0, "big", [1] * 40, params())  # 10 of the 16 blocks
    s.add_request(0, "big2", [2] * 40, params())  # does not fit beside it: waits
    s.add_request(0, "small", [3, 4], params())  # would fit, but stands behind big2
    assert s.num_blocked_waiting() == 2
    with pytest.raises(QueueFull):
        s.add_request(0, "more", [5, 6], params())


def test_zero_means_unbounded():
    config = SchedulerConfig(block_size=4, max_num_seqs=1, max_num_batched_tokens=64, max_num_waiting=0)
    s = Scheduler(config, 16, 128, [99], vocab_size=100)
    for i in range(2000):
        s.add_request(0, f"r{i}", [1, 2], params())
    assert len(s.waiting) == 2000


def test_top_logprobs_beyond_the_vocabulary_are_refused_by_name():
    config = SchedulerConfig(block_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    s = Scheduler(config, 16, 128, [9], vocab_size=10)  # the workers' topk would fail the whole step
    with pytest.raises(InvalidField) as err:
        s.add_request(0, "r", [1, 2], params(logprobs=True, top_logprobs=11))
    assert err.value.field == "top_logprobs" and "vocabulary of 10 tokens" in str(err.value)
    s.add_request(0, "ok", [1, 2], params(logprobs=True, top_logprobs=10))
