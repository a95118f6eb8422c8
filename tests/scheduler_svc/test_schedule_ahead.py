"""Scheduler.schedule_ahead: the next decode step planned while the previous one is still on the
workers, driven the way EngineCore drives it (at most two steps in flight, results applied in order)
against the toy worker, which runs the real plan application and stores token ids in its KV slots."""

from collections import deque

import pytest

from tests.scheduler_svc.factories import ToyWorker, check_invariants, params, scheduler, toy_logprobs


def drive(s, worker, pipelined: bool, abort_at: dict | None = None, add_at: dict | None = None):
    """Runs the scheduler to completion; returns {request_id: (tokens, finish_reason)} and the step count.
    ``abort_at`` / ``add_at``: {step number: [request ids]} aborted / [(id, prompt, params)] added before
    that step is planned, while a step planned ahead may be in flight."""
    abort_at, add_at = abort_at or {}, add_at or {}
    results: dict[str, list] = {}
    in_flight: deque = deque()
    n = 0

    def collect(outputs):
        for o in outputs:
            entry = results.setdefault(o.seq.request.request_id, [[], None])
            entry[0] += o.token_ids
            if o.finish_reason:
                entry[1] = o.finish_reason

    while s.has_work() or in_flight:
        for rid in abort_at.pop(n, []):
            collect(s.abort_request(0, rid))
        for rid, prompt, p in add_at.pop(n, []):
            s.add_request(0, rid, prompt, p)
        if not in_flight:
            out = s.schedule()
            # Nothing in flight: once this plan is applied, the workers' tokens, tables and slots
            # must match the scheduler's.
            in_flight.append((out, worker.run(out, s)))
        if pipelined:
            ahead = s.schedule_ahead(in_flight[-1][0])
            if ahead is not None:
                in_flight.append((ahead, worker.run(ahead)))
        out, (sampled, top) = in_flight.popleft()
        collect(s.update(out, sampled, top=top))
        if not in_flight:
            check_invariants(s)
        n += 1
    return {rid: (tokens, reason) for rid, (tokens, reason) in results.items()}, n


def toy_greedy(prompt, max_tokens, eos=99):
    tokens = list(prompt)
    out = []
    for _ in range(max_tokens):
        lps = toy_logprobs(tokens)
        t = max(range(len(lps)), key=lps.__getitem__)
        out.append(t)
        tokens.append(t)
        if t == eos:
            break
    return out


def workload():
    # Prompts of several lengths (block boundaries crossed on the way), max_tokens from 1 to 24.
    return [(f"r{i}", [(7 * i + j) % 90 + 3 for j in range(3 + 5 * i)], params(max_tokens=1 + (5 * i) % 24))
            for i in range(10)]


@pytest.mark.parametrize("eos", [(99,), None], ids=["toy-eos", "eos-found-by-search"])
def test_pipelined_steps_give_the_same_results_and_free_everything(eos):
    reqs = workload()
    if eos is None:  # pick an EOS id that the toy model emits mid-sequence for some requests
        counts: dict[int, int] = {}
        for _, prompt, p in reqs:
            for t in toy_greedy(prompt, p.max_tokens, eos=-1)[:-1]:
                counts[t] = counts.get(t, 0) + 1
        eos = (max(counts, key=counts.get),)
    runs = {}
    for pipelined in (False, True):
        s = scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=32, eos=eos)
        for rid, prompt, p in reqs:
            s.add_request(0, rid, prompt, p)
        worker = ToyWorker(s)
        runs[pipelined] = drive(s, worker, pipelined)
        assert s.pool.num_free_blocks == 64 and not s.requests
        if pipelined:
            assert s.stats.num_ahead_steps > 0
            assert s.stats.num_ahead_steps >= runs[pipelined][1] // 3, "decode steps were not planned ahead"
        else:
            assert s.stats.num_ahead_steps == 0
    assert runs[True][0] == runs[False][0]
    for rid, prompt, p in reqs:  # and both equal the toy model run directly
        tokens, reason = runs[True][0][rid]
        assert tokens == toy_greedy(prompt, p.max_tokens, eos=eos[0]), rid
    stopped = [rid for rid, (tokens, _) in runs[True][0].items() if tokens[-1] == eos[0]]
    assert stopped, "no request ended on EOS: the extra-token path was not exercised"


def test_abort_and_admission_while_a_step_is_planned_ahead():
    reqs = workload()
    late = [("late", [5, 6, 7, 8, 9], params(max_tokens=6))]
    results = {}
    for pipelined in (False, True):
        s = scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=32)
        for rid, prompt, p in reqs:
            s.add_request(0, rid, prompt, p)
        worker = ToyWorker(s)
        results[pipelined], _ = drive(s, worker, pipelined, abort_at={6: ["r9", "r7"]}, add_at={8: late})
        assert s.pool.num_free_blocks == 64 and not s.requests
    assert results[True]["late"] == results[False]["late"]
    assert results[True]["late"][0] == toy_greedy(late[0][1], 6)
    for rid in ("r7", "r9"):
        assert results[True][rid][1] == results[False][rid][1] != 0  # aborted in both


def test_prefill_chunks_and_admissions_are_planned_ahead():
    s = scheduler(num_blocks=64, block_size=4, budget=6)
    s.add_request(0, "long", list(range(3, 13)), params(max_tokens=4))  # 10 tokens: two chunks at budget 6
    out = s.schedule()
    assert [(r.seq.request.request_id, r.num_scheduled_tokens) for r in out.new_seqs] == [("long", 6)]
    # The second chunk's tokens are the prompt's: planned before the first chunk's results.
    ahead = s.schedule_ahead(out)
    assert [(r.seq.request.request_id, r.num_scheduled_tokens, r.new_block_ids) for r in ahead.running] == [
        ("long", 4, [2])]
    worker = ToyWorker(s)
    first, second = worker.run(out)[0], worker.run(ahead)[0]
    assert first == {} and list(second) == [0]  # the first chunk does not sample; the second does
    s.update(out, first)
    # A request that arrives while the last chunk is in flight is admitted beside the decode of the token
    # that chunk samples.
    s.add_request(0, "waiting", [3, 4], params(max_tokens=2))
    next_ahead = s.schedule_ahead(ahead)
    assert [(r.seq.request.request_id, r.num_scheduled_tokens) for r in next_ahead.running] == [("long", 1)]
    assert [(r.seq.request.request_id, r.num_scheduled_tokens, r.block_table) for r in next_ahead.new_seqs] == [
        ("waiting", 2, [3])]
    s.update(ahead, second)
    s.update(next_ahead, worker.run(next_ahead)[0])
    while s.has_work():
        step = s.schedule()
        s.update(step, worker.run(step)[0])
    assert s.pool.num_free_blocks == 64 and not s.requests


def test_no_plan_ahead_where_the_next_step_depends_on_results():
    beams = scheduler(num_blocks=64, block_size=4)
    beams.add_request(0, "beam", [3, 4, 5], params(beam_width=2, max_tokens=4))
    assert beams.schedule_ahead(beams.schedule()) is None

    # A sequence that the step in flight ends by length is left out of the plan.
    s = scheduler(num_blocks=64, block_size=4)
    s.add_request(0, "one", [3, 4, 5], params(max_tokens=1))
    s.add_request(0, "two", [3, 4, 6], params(max_tokens=2))
    out = s.schedule()
    ahead = s.schedule_ahead(out)
    assert [r.seq.request.request_id for r in ahead.running] == ["two"]
    worker = ToyWorker(s)
    s.update(out, worker.run(out)[0])
    s.update(ahead, worker.run(ahead)[0])
    assert not s.running and s.pool.num_free_blocks == 64 and not s.requests


class RecordingWorker(ToyWorker):
    """The toy worker, noting the tokens each slot of each plan computes when it runs the plan."""

    def __init__(self, sched):
        super().__init__(sched)
        self.steps: list[list[int]] = []

    def run(self, out, sched=None):
        self.steps.append([r.num_scheduled_tokens for r in out.new_seqs + out.running])
        return super().run(out, sched)


@pytest.mark.parametrize("pipelined", [False, True], ids=["one-step", "planned-ahead"])
def test_a_prefill_cap_bounds_the_prompt_tokens_of_steps_that_decode_and_changes_no_token(pipelined):
    """--max-prefill-tokens-with-decodes 5: every step that decodes computes at most 5 prompt tokens (so
    arrivals lengthen the decodes' steps less), a step without decodes still takes the whole budget, and
    the tokens generated are the same as without the cap, in more steps."""
    reqs = [(rid, prompt, params(max_tokens=12)) for rid, prompt, _ in reversed(workload())]  # 48 tokens first
    runs = {}
    for cap in (0, 5):
        s = scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=32, prefill_cap=cap)
        worker = RecordingWorker(s)
        s.add_request(0, *reqs[0])
        adds = {2 * i: [r] for i, r in enumerate(reqs[1:], 1)}  # arrivals beside decodes
        runs[cap] = drive(s, worker, pipelined, add_at=adds)
        assert s.pool.num_free_blocks == 64 and not s.requests
        # A slot of one token is a decode (or a prompt's last token): the rest are prompt tokens.
        mixed = [sum(n for n in slots if n > 1) for slots in worker.steps if 1 in slots and max(slots) > 1]
        assert len(mixed) >= 5
        if cap:
            assert max(mixed) <= cap, mixed
            assert any(sum(slots) > cap for slots in worker.steps if 1 not in slots)  # whole budget: no decode
        else:
            assert max(mixed) > 5
    assert runs[5][0] == runs[0][0]
    assert runs[5][1] > runs[0][1]  # the same tokens, in more steps
