"""One request's data never ends the engine: an exception raised while the scheduler processes one
request (its beam scoring, its stop check, its admission) fails that request alone, INTERNAL and
naming the cause, frees its blocks, and every other request goes on. Also the length penalties that
used to raise in the beam scorer (1000, 3e38, -2000) run to the end."""

import pytest

import clients  # noqa: F401
from pagedserve.internal.v1 import scheduler_pb2
from scheduler_svc.scheduler import INTERNAL, Scheduler
from scheduler_svc.sequence_groups import SequenceGroups
from tests.scheduler_svc.factories import ToyWorker, check_invariants, params, run_step, scheduler
from tests.scheduler_svc.test_engine import ERROR, LENGTH, expected_tokens, finished, make_engine, run_until, submit


def overflow() -> OverflowError:
    return OverflowError(34, "Numerical result out of range")  # what Python's float power raises


def run_to_end(sched: Scheduler, worker: ToyWorker, max_steps: int = 100) -> list:
    outputs = []
    for _ in range(max_steps):
        if not sched.has_work():
            return outputs
        _, out = run_step(sched, worker)
        outputs += out
        check_invariants(sched)
    raise AssertionError("the scheduler did not finish")


@pytest.mark.parametrize("length_penalty", [1000.0, 3e38, -2000.0])
def test_extreme_length_penalties_run_to_the_end(length_penalty):
    sched = scheduler(num_blocks=32)
    worker = ToyWorker(sched)
    sched.add_request(0, "beams", [1, 2, 3], params(max_tokens=6, beam_width=2, length_penalty=length_penalty))
    outputs = run_to_end(sched, worker)
    assert sorted(o.seq.index for o in outputs) == [0, 1]
    assert all(o.finish_reason in (LENGTH, scheduler_pb2.FINISH_REASON_STOP) and not o.error for o in outputs)
    assert sched.pool.num_free_blocks == sched.pool.num_blocks and not sched.requests


def _isolated(sched: Scheduler, worker: ToyWorker, bad: str) -> None:
    """Runs ``bad`` and a plain request side by side: ``bad`` ends with one INTERNAL error, the other
    completes, and nothing is left behind."""
    outputs = run_to_end(sched, worker)
    failed = [o for o in outputs if o.seq.request.request_id == bad]
    assert len(failed) == 1
    (f,) = failed
    assert (f.finish_reason, f.status_code) == (ERROR, INTERNAL)
    assert f.error == "the scheduler could not process this request: OverflowError: Numerical result out of range"
    good = [t for o in outputs if o.seq.request.request_id == "good" for t in o.token_ids]
    assert len(good) == 5 and outputs[-1].seq.request.request_id == "good" and outputs[-1].finish_reason == LENGTH
    assert sched.pool.num_free_blocks == sched.pool.num_blocks and not sched.requests
    worker.run(sched.schedule(), sched)  # the next plan drops every sequence on the workers


def test_a_beam_scorer_that_raises_fails_its_request_alone(monkeypatch):
    sched = scheduler(num_blocks=32)
    worker = ToyWorker(sched)
    beams = sched.add_request(0, "bad", [1, 2, 3], params(max_tokens=6, beam_width=2))
    sched.add_request(0, "good", [4, 5, 6], params(max_tokens=5))
    calls = []

    def step(*args):
        calls.append(args)
        if len(calls) == 3:
            raise overflow()
        return type(beams.beam).step(beams.beam, *args)

    monkeypatch.setattr(beams.beam, "step", step)
    _isolated(sched, worker, "bad")


def test_a_half_done_beam_reselection_leaves_no_forked_beam_behind(monkeypatch):
    """The re-selection raises after forking a beam that the request does not list yet: that beam ends
    too (the workers drop it, its blocks are freed)."""
    sched = scheduler(num_blocks=32)
    worker = ToyWorker(sched)
    sched.add_request(0, "bad", [1, 2, 3], params(max_tokens=6, beam_width=2))
    sched.add_request(0, "good", [4, 5, 6], params(max_tokens=5))
    real_child = SequenceGroups._child
    forked = []

    def child(self, *args):
        forked.append(real_child(self, *args))
        raise overflow()

    monkeypatch.setattr(SequenceGroups, "_child", child)
    _isolated(sched, worker, "bad")
    assert forked, "the re-selection did fork"


def test_a_stop_check_that_raises_fails_that_request_while_the_engine_goes_on(monkeypatch):
    engine, workers = make_engine()
    real = Scheduler._stop_reason

    def stop_reason(self, seq, token):
        if seq.request.request_id == "bad" and seq.num_output_tokens == 2:
            raise overflow()
        return real(self, seq, token)

    monkeypatch.setattr(Scheduler, "_stop_reason", stop_reason)
    events = []
    stream = engine.open_stream(events.append)
    engine.submit(stream, submit("bad", [1, 2, 3], 6))
    engine.submit(stream, submit("good", [4, 5], 6))
    assert run_until(engine, lambda: finished(events, {"bad", "good"})) is None  # the loop did not fail
    outputs = [o for e in events for o in e.outputs]
    bad = [o for o in outputs if o.request_id == "bad"]
    assert [list(o.token_ids) for o in bad] == [expected_tokens([1, 2, 3], 1), []]
    assert (bad[-1].finish_reason, bad[-1].status_code) == (ERROR, INTERNAL)
    assert bad[-1].error == "the scheduler could not process this request: OverflowError: Numerical result out of range"
    good = [t for o in outputs if o.request_id == "good" for t in o.token_ids]
    assert good == expected_tokens([4, 5], 6)
    info = engine.engine_info()
    assert (info.stats.num_requests, info.stats.num_free_blocks) == (0, 64)
    assert engine.failure is None
    assert workers.seq_id_of([1, 2, 3]) not in workers.seqs, "the workers were told to drop it"


def test_a_submit_that_raises_is_refused_alone(monkeypatch):
    engine, _ = make_engine()
    real = SequenceGroups.start

    def start(request, max_num_tokens):
        if request.request_id == "bad":
            raise ZeroDivisionError("float division by zero")
        real(request, max_num_tokens)

    monkeypatch.setattr(SequenceGroups, "start", staticmethod(start))
    events = []
    stream = engine.open_stream(events.append)
    engine.submit(stream, submit("bad", [1, 2, 3], 4))
    engine.submit(stream, submit("good", [4, 5], 4))
    assert run_until(engine, lambda: finished(events, {"bad", "good"})) is None
    outputs = {o.request_id: o for e in events for o in e.outputs if o.finish_reason}
    assert (outputs["bad"].finish_reason, outputs["bad"].status_code) == (ERROR, INTERNAL)
    assert outputs["bad"].error == (
        "the scheduler could not accept this request: ZeroDivisionError: float division by zero")
    assert outputs["good"].finish_reason == LENGTH
    assert engine.engine_info().stats.num_requests == 0
