"""Forks and copy-on-write: parallel sampling shares the prompt's blocks, beam search forks survivors
and drops the rest; a write into a shared block takes a fresh one and a copy. Exact ids and counts."""

import clients  # noqa: F401
from pagedserve.internal.v1 import scheduler_pb2, worker_pb2
from scheduler_svc.request import sample_seed
from scheduler_svc.step_plan import encode_step
from tests.scheduler_svc.factories import ToyWorker, check_invariants, params, run_step, scheduler, step


def refs(s, n):
    return [b.ref_cnt for b in s.pool.blocks[:n]]


def test_parallel_sampling_computes_prompt_minus_one_then_forks_and_copies_the_shared_last_block():
    s = scheduler(num_blocks=16, block_size=4)
    s.add_request(0, "a", [1, 2, 3, 4, 5, 6], params(max_tokens=3, n=3))
    out, outputs = step(s)
    assert [(n.seq.seq_id, n.num_scheduled_tokens, n.block_table) for n in out.new_seqs] == [(0, 5, [0, 1])]
    assert outputs == []  # prompt[:-1]: nothing sampled yet
    out = s.schedule()
    assert [(f.parent_seq_id, f.child.seq_id, f.token_id) for f in out.forks] == [(0, 1, None), (0, 2, None)]
    # All three write position 5, in block 1 which they share: the first two copy, the last keeps it.
    assert [(r.seq.seq_id, r.num_scheduled_tokens, r.new_block_ids) for r in out.running] == [
        (0, 1, []), (1, 1, []), (2, 1, [])
    ]
    assert out.copies == [(1, 2), (1, 3)]
    assert out.table_updates == [(0, [1], [2]), (1, [1], [3])]
    assert refs(s, 5) == [3, 1, 1, 1, 0]  # the full first block stays shared by all three
    assert [s.kv.block_table(i) for i in range(3)] == [[0, 2], [0, 3], [0, 1]]
    outputs = s.update(out, {0: 7, 1: 8, 2: 9})
    assert [(o.seq.index, o.token_ids) for o in outputs] == [(0, [7]), (1, [8]), (2, [9])]
    check_invariants(s)
    while s.has_work():
        step(s)
    assert s.pool.num_free_blocks == 16


def test_fork_at_a_block_boundary_takes_new_blocks_without_copies():
    s = scheduler(num_blocks=16, block_size=4)
    s.add_request(0, "a", [1, 2, 3, 4, 5], params(max_tokens=3, n=2))
    step(s)
    out = s.schedule()
    assert [(r.seq.seq_id, r.new_block_ids) for r in out.running] == [(0, [1]), (1, [2])]
    assert out.copies == [] and refs(s, 3) == [2, 1, 1]


def test_a_one_token_prompt_starts_n_sequences_at_once():
    s = scheduler(num_blocks=16, block_size=4)
    s.add_request(0, "a", [7], params(max_tokens=2, n=3))
    out = s.schedule()
    assert [(n.seq.seq_id, n.seq.index, n.num_scheduled_tokens, n.block_table) for n in out.new_seqs] == [
        (0, 0, 1, [0]), (1, 1, 1, [1]), (2, 2, 1, [2])
    ]
    assert out.forks == []  # the workers learn every sample as a new sequence
    assert sorted(o.seq.index for o in s.update(out, {0: 5, 1: 6, 2: 7})) == [0, 1, 2]


def test_samples_get_seeds_derived_from_the_request_seed_and_carry_them_in_the_fork():
    s = scheduler(num_blocks=16, block_size=4)
    s.add_request(0, "a", [1, 2, 3], params(max_tokens=2, n=3, seed=42))
    step(s)
    plan = worker_pb2.WorkerCommand.FromString(encode_step(s.schedule())).step
    seeds = [f.sampling_params.seed for f in plan.forks]
    assert seeds == [sample_seed(42, 1), sample_seed(42, 2)] and len(set(seeds + [42])) == 3
    assert all(f.sampling_params.has_seed and not f.HasField("token_id") for f in plan.forks)
    assert sample_seed(42, 0) == 42  # sample 0 samples as n=1 would


def test_unseeded_samples_inherit_the_parent_parameters():
    s = scheduler(num_blocks=16, block_size=4)
    s.add_request(0, "a", [1, 2, 3], params(max_tokens=2, n=2))
    step(s)
    plan = worker_pb2.WorkerCommand.FromString(encode_step(s.schedule())).step
    assert [f.HasField("sampling_params") for f in plan.forks] == [False]


def test_beam_search_forks_survivors_overrides_last_tokens_and_drops_the_rest():
    s = scheduler(num_blocks=16, block_size=4, eos=(99,))
    s.add_request(0, "b", [1, 2, 3], params(max_tokens=5, beam_width=2))
    out = s.schedule()
    # 2 * beam_width candidates, asked of the workers by the plan
    assert worker_pb2.WorkerCommand.FromString(encode_step(out)).step.num_top_logprobs == 4
    # The prompt's single beam: candidates 7 (-0.1) and 8 (-0.2) both survive.
    assert s.update(out, {0: 7}, top={0: ([7, 8, 9, 10], [-0.1, -0.2, -3.0, -4.0])}) == []
    out = s.schedule()
    assert [(f.parent_seq_id, f.child.seq_id, f.token_id) for f in out.forks] == [(0, 1, 8)]
    assert out.last_tokens == []  # beam 0 keeps the token the worker sampled
    assert [s.seq.token_ids for s in out.running] == [[1, 2, 3, 7], [1, 2, 3, 8]]
    assert out.copies == [(0, 1)] and out.table_updates == [(0, [0], [1])]  # both write position 3 of block 0
    # Beam 1 (score -0.2) now beats beam 0 twice: beam 0 is dropped, beam 1 continues with 5 and forks 6.
    top = {0: ([5, 6, 11, 12], [-3.0, -3.1, -3.2, -3.3]), 1: ([6, 5, 13, 14], [-0.1, -0.2, -5.0, -5.0])}
    assert s.update(out, {0: 5, 1: 6}, top=top) == []
    out = s.schedule()
    assert out.finished_seq_ids == [0]
    assert [(f.parent_seq_id, f.child.seq_id, f.token_id) for f in out.forks] == [(1, 2, 5)]
    assert out.last_tokens == []
    assert [s.seq.token_ids for s in out.running] == [[1, 2, 3, 8, 6], [1, 2, 3, 8, 5]]
    check_invariants(s)
    cmd = worker_pb2.WorkerCommand.FromString(encode_step(out)).step
    assert [(f.parent_seq_id, f.child_seq_id, f.token_id) for f in cmd.forks] == [(1, 2, 5)]


def test_beam_search_overrides_the_sampled_token_when_another_candidate_wins():
    s = scheduler(num_blocks=16, block_size=4, eos=(99,))
    s.add_request(0, "b", [1, 2, 3], params(max_tokens=5, beam_width=2))
    out = s.schedule()
    # The worker sampled 7, but the top list (as sorted by the scheduler) makes 8 and 9 the beams.
    s.update(out, {0: 7}, top={0: ([8, 9, 7, 10], [-0.1, -0.2, -3.0, -4.0])})
    out = s.schedule()
    assert out.last_tokens == [(0, 8)] and [(f.child.seq_id, f.token_id) for f in out.forks] == [(1, 9)]
    plan = worker_pb2.WorkerCommand.FromString(encode_step(out)).step
    assert list(plan.last_token_seq_ids) == [0] and list(plan.last_token_ids) == [8]


def test_beam_search_reports_the_best_hypotheses_best_first_with_final_tokens():
    s = scheduler(num_blocks=16, block_size=4, eos=(99,))
    s.add_request(0, "b", [1, 2, 3], params(max_tokens=2, beam_width=2))
    out = s.schedule()
    s.update(out, {0: 7}, top={0: ([7, 99, 8, 10], [-0.1, -0.2, -0.3, -4.0])})  # 99 finishes a hypothesis
    out = s.schedule()
    top = {0: ([5, 6, 11, 12], [-1.0, -1.1, -3.2, -3.3]), 1: ([6, 5, 13, 14], [-0.1, -0.2, -5.0, -5.0])}
    outputs = s.update(out, {0: 5, 1: 6}, top=top)  # max_tokens: every candidate stops
    assert [(o.seq.index, o.final_token_ids, o.finish_reason, o.token_ids) for o in outputs] == [
        (0, [99], scheduler_pb2.FINISH_REASON_STOP, []),  # -0.2 / 1
        (1, [8, 6], scheduler_pb2.FINISH_REASON_LENGTH, []),  # -0.4 / 2
    ]
    assert s.requests == {} and not s.has_work()
    s.schedule()
    assert s.pool.num_free_blocks == 16


def test_beams_step_together_and_match_a_plain_beam_loop_under_swapping():
    """Through the toy worker (real plan application, KV content checked), beam search over a pool so
    small that the group is swapped out and back gives the hypotheses of an unconstrained run."""

    def run(num_blocks, num_cpu_blocks):
        s = scheduler(num_blocks=num_blocks, block_size=2, max_model_len=40, eos=(99,), num_cpu_blocks=num_cpu_blocks)
        w = ToyWorker(s)
        s.add_request(0, "first", [5, 6, 7, 8, 9, 10, 11, 12, 13], params(max_tokens=16, ignore_eos=True))
        s.add_request(0, "beams", [1, 2, 3, 4, 5], params(max_tokens=8, beam_width=3))
        finals = []
        while s.has_work():
            _, outputs = run_step(s, w)
            finals += [(o.seq.index, o.final_token_ids) for o in outputs if o.final_token_ids]
            check_invariants(s)
        return finals, s.stats.num_swap_preemptions

    want, swaps = run(num_blocks=64, num_cpu_blocks=0)
    assert swaps == 0 and [i for i, _ in want] == [0, 1, 2]
    got, swaps = run(num_blocks=17, num_cpu_blocks=32)
    assert swaps > 0 and got == want
