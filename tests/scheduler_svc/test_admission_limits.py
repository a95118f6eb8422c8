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
    s.add_request(0, "a", [1, 2], params())
    s.add_request(0, "b", [3, 4], params())
    with pytest.raises(QueueFull, match=r"2 sequences are waiting for admission \(--max-num-waiting 2\)"):
        s.add_request(0, "c", [5, 6], params())
    with pytest.raises(InvalidField):  # an invalid request is refused as such, full queue or not
        s.add_request(0, "d", [], params())
    assert set(s.requests) == {(0, "a"), (0, "b")}
    s.schedule()  # admits "a" (one sequence at a time): one waits, so there is room for one more
    s.add_request(0, "c", [5, 6], params())
    assert [seq.request.request_id for seq in s.waiting] == ["b", "c"]
    check_invariants(s)


def test_zero_means_unbounded():
    config = SchedulerConfig(block_size=4, max_num_seqs=1, max_num_batched_tokens=64, max_num_waiting=0)
    s = Scheduler(config, 16, 128, [99], vocab_size=100)
    for i in range(2000):
        s.add_request(0, f"r{i}", [1, 2], params())
    assert len(s.waiting) == 2000
