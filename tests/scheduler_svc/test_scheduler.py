import pytest

import clients  # noqa: F401
from gpu_worker.sampling_params import InvalidField
from pagedserve.internal.v1 import scheduler_pb2, worker_pb2
from scheduler_svc.step_plan import encode_step
from tests.scheduler_svc.factories import check_invariants, params, sampled_for, scheduler, step

FR = scheduler_pb2


def test_fcfs_admission_then_decode_deltas():
    s = scheduler(num_blocks=16, block_size=4)
    s.add_request(0, "a", [1, 2, 3, 4, 5], params())  # 2 blocks
    s.add_request(0, "b", [6, 7, 8], params())  # 1 block
    out = s.schedule()
    assert [(n.seq.seq_id, n.num_scheduled_tokens, n.block_table) for n in out.new_seqs] == [
        (0, 5, [0, 1]),
        (1, 3, [2]),
    ]
    outputs = s.update(out, {0: 10, 1: 11})
    assert [(o.seq.seq_id, o.token_ids) for o in outputs] == [(0, [10]), (1, [11])]
    out = s.schedule()  # decode: seq 0 has 6 tokens (fits 2 blocks), seq 1 has 4 (fits 1)
    assert [(r.seq.seq_id, r.num_scheduled_tokens, r.new_block_ids) for r in out.running] == [(0, 1, []), (1, 1, [])]
    s.update(out, {0: 12, 1: 13})
    out = s.schedule()  # seq 1 now writes its 5th token: a new block
    assert [(r.seq.seq_id, r.new_block_ids) for r in out.running] == [(0, []), (1, [3])]
    check_invariants(s)


def test_prompt_longer_than_budget_is_chunked_and_decodes_go_first():
    s = scheduler(num_blocks=32, block_size=4, budget=8)
    s.add_request(0, "short", [1, 2], params(max_tokens=8))
    s.add_request(0, "long", list(range(1, 20)), params())  # 19 tokens
    out, _ = step(s)
    assert [(n.seq.seq_id, n.num_scheduled_tokens) for n in out.new_seqs] == [(0, 2), (1, 6)]
    out, outputs = step(s)
    # decode of "short" first, then a 7-token chunk of "long"; no token sampled for the chunk
    assert [(r.seq.seq_id, r.num_scheduled_tokens) for r in out.running] == [(0, 1), (1, 7)]
    assert [o.seq.seq_id for o in outputs] == [0]
    out, outputs = step(s)
    assert [(r.seq.seq_id, r.num_scheduled_tokens) for r in out.running] == [(0, 1), (1, 6)]
    assert sorted(o.seq.seq_id for o in outputs) == [0, 1]  # "long" finished its prompt
    check_invariants(s)


def test_recompute_preemption_takes_latest_arrival_and_resumes_it():
    s = scheduler(num_blocks=4, block_size=2, max_model_len=64)
    s.add_request(0, "a", [1, 2, 3], params(max_tokens=4))  # 2 blocks
    s.add_request(0, "b", [4, 5, 6], params(max_tokens=4))  # 2 blocks: pool full
    step(s)
    assert s.pool.num_free_blocks == 0
    out, _ = step(s)  # 4th tokens still fit the 2 blocks
    assert not out.preempted
    out, _ = step(s)  # both need a 3rd block for their 5th token: "b" is preempted for "a"
    assert [p.seq_id for p in out.preempted] == [1]
    assert out.finished_seq_ids == [1]  # the workers drop the preempted state before this step
    # b freed [2, 3] tail first, so its tail block 3 is reused first
    assert [(r.seq.seq_id, r.new_block_ids) for r in out.running] == [(0, [3])]
    assert s.stats.num_preemptions == 1 and [q.seq_id for q in s.waiting] == [1]
    b = s.waiting[0]
    assert b.num_computed_tokens == 0 and b.token_ids == [4, 5, 6, 5, 5]  # keeps its outputs
    check_invariants(s)
    while s.has_work():
        step(s)
        check_invariants(s)
    assert s.pool.num_free_blocks == 4
    assert b.token_ids == [4, 5, 6, 5, 5, 5, 5] and b.finish_reason == FR.FINISH_REASON_LENGTH


def test_stop_conditions():
    s = scheduler(eos=(99,))
    s.add_request(0, "eos", [1], params(max_tokens=10))
    s.add_request(0, "ignore", [1], params(max_tokens=2, ignore_eos=True))
    s.add_request(0, "stopid", [1], params(max_tokens=10, stop_token_ids=[42]))
    out = s.schedule()
    outputs = s.update(out, {0: 99, 1: 99, 2: 42})
    reasons = {o.seq.request.request_id: o.finish_reason for o in outputs}
    assert reasons == {"eos": FR.FINISH_REASON_STOP, "ignore": 0, "stopid": FR.FINISH_REASON_STOP}
    out = s.schedule()
    assert sorted(out.finished_seq_ids) == [0, 2]
    (o,) = s.update(out, {1: 99})
    assert o.finish_reason == FR.FINISH_REASON_LENGTH and o.seq.token_ids == [1, 99, 99]


def test_context_length_ends_generation():
    s = scheduler(max_model_len=6)
    s.add_request(0, "r", [1, 2, 3, 4], params(max_tokens=50))
    outputs = []
    while s.has_work():
        outputs += step(s)[1]
    assert outputs[-1].finish_reason == FR.FINISH_REASON_LENGTH and outputs[-1].seq.num_tokens == 6


def test_abort_frees_blocks_at_once():
    s = scheduler()
    s.add_request(7, "x", [1, 2, 3, 4, 5], params(max_tokens=10))
    s.add_request(7, "y", [1], params(max_tokens=10))
    step(s)
    (o,) = s.abort_request(7, "x")
    assert o.finish_reason == FR.FINISH_REASON_ABORT
    assert s.pool.num_free_blocks == 16 - 1
    assert s.abort_request(7, "x") == []
    assert len(s.abort_stream(7)) == 1 and s.pool.num_free_blocks == 16
    assert not s.has_work() and s.requests == {}
    check_invariants(s)


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "field"),
    [([], 4, "prompt"), ([1] * 128, 4, "prompt"), ([1, 100], 4, "prompt"), ([1], 0, "max_tokens"),
     ([1] * 60, 60, "max_tokens")],
)
def test_invalid_requests_name_the_field_and_allocate_nothing(prompt, max_tokens, field):
    s = scheduler(num_blocks=16, block_size=4, max_model_len=128)  # pool: 64 tokens
    with pytest.raises(InvalidField) as err:
        s.add_request(0, "r", prompt, params(max_tokens=max_tokens))
    assert err.value.field == field
    assert not s.has_work() and s.pool.num_free_blocks == 16


def test_duplicate_request_id_on_a_stream_is_rejected():
    s = scheduler()
    s.add_request(0, "r", [1], params())
    with pytest.raises(InvalidField, match="already running"):
        s.add_request(0, "r", [1], params())
    s.add_request(1, "r", [1], params())  # other stream: fine


def test_step_plan_encodes_new_seqs_in_full_and_running_as_deltas():
    s = scheduler(num_blocks=16, block_size=2)
    s.add_request(0, "a", [1, 2, 3], params(top_logprobs=2))
    out, _ = step(s)
    s.add_request(0, "b", [4], params())
    out = s.schedule()
    cmd = worker_pb2.WorkerCommand.FromString(encode_step(out))
    plan = cmd.step
    assert plan.step_id == 1
    assert [(n.seq_id, list(n.token_ids), list(n.block_ids), n.num_scheduled_tokens) for n in plan.new_seqs] == [
        (1, [4], [2], 1)
    ]
    assert list(plan.running_seq_ids) == [0]
    assert list(plan.running_num_scheduled_tokens) == [1]
    assert list(plan.running_num_new_blocks) == [0]  # 4th token still fits block 1
    assert plan.num_top_logprobs == 2


def test_a_multi_sequence_group_is_swapped_out_and_back_keeping_its_sharing():
    s = scheduler(num_blocks=10, block_size=2, max_model_len=64, num_cpu_blocks=8)
    s.add_request(0, "a", [1, 2, 3], params(max_tokens=8, ignore_eos=True))
    s.add_request(0, "g", [4, 5, 6], params(max_tokens=6, n=2, ignore_eos=True))  # samples 1 and 2
    for _ in range(5):
        step(s)
    out, _ = step(s)  # a needs a block: the latest group (g) leaves for the CPU pool
    assert [p.seq_id for p in out.preempted] == [1, 2] and out.finished_seq_ids == [1, 2]
    assert out.swap_out == [(2, 0), (3, 1), (6, 2), (4, 3), (7, 4)]  # block 2 (prompt) once, shared
    assert [s.seq_id for s in s.swapped] == [1, 2] and s.cpu_pool.num_free_blocks == 3
    assert [b.ref_cnt for b in s.cpu_pool.blocks[:5]] == [2, 1, 1, 1, 1]
    assert s.stats.num_swap_preemptions == 2 and s.stats.num_preemptions == 2
    check_invariants(s)
    for _ in range(2):
        step(s)
    out, _ = step(s)
    assert out.swap_in == [(0, 6), (1, 3), (2, 7), (3, 4), (4, 2)]
    # Back as new sequences that carry their computed tokens, and compute one token each.
    assert [(n.seq.seq_id, n.num_scheduled_tokens, n.seq.num_computed_tokens, n.block_table) for n in out.new_seqs] == [
        (1, 1, 7, [6, 3, 7, 9]), (2, 1, 7, [6, 4, 2, 8])
    ]
    check_invariants(s)
    while s.has_work():
        step(s)
    assert s.pool.num_free_blocks == 10 and s.cpu_pool.num_free_blocks == 8


def test_groups_recompute_without_swap_space_and_single_sequences_always_recompute():
    s = scheduler(num_blocks=10, block_size=2, max_model_len=64, num_cpu_blocks=0)
    s.add_request(0, "a", [1, 2, 3], params(max_tokens=8, ignore_eos=True))
    s.add_request(0, "g", [4, 5, 6], params(max_tokens=6, n=2, ignore_eos=True))
    while not s.stats.num_preemptions:
        out, _ = step(s)
    assert [p.seq_id for p in out.preempted] == [1, 2] and out.swap_out == []
    assert [q.seq_id for q in s.waiting] == [1, 2] and s.stats.num_swap_preemptions == 0
    while s.has_work():
        step(s)
        check_invariants(s)


def test_a_beam_search_that_cannot_swap_or_use_the_cache_fails_instead_of_recomputing():
    s = scheduler(num_blocks=12, block_size=2, max_model_len=64, num_cpu_blocks=0, prefix_caching=False)
    s.add_request(0, "a", [1, 2, 3], params(max_tokens=16, ignore_eos=True))
    s.add_request(0, "b", [4, 5, 6], params(max_tokens=8, beam_width=2, ignore_eos=True))
    outputs = []
    for i in range(40):
        out = s.schedule()
        top = {k: ([7, 8], [-0.5, -50.0 - i]) for k in sampled_for(out)}  # each beam keeps its own path
        outputs += s.update(out, sampled_for(out, 7), top=top)
    (failed,) = [o for o in outputs if o.finish_reason == FR.FINISH_REASON_ERROR]
    assert failed.seq.request.request_id == "b" and "swap" in failed.error
    assert not s.has_work() and s.pool.num_free_blocks == 12
