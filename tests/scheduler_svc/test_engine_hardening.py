"""EngineCore under pressure, against the in-process fake workers of test_engine: a full waiting queue
refuses with RESOURCE_EXHAUSTED and a retry hint, the step watchdog's budget, honest messages when the
engine stops or its workers leave during a stop, top logprobs passed on per request, and the start-up
warning of a pool shorter than one sequence."""

from dataclasses import dataclass, field

import pytest

import clients  # noqa: F401
from pagedserve.internal.v1 import worker_pb2
from scheduler_svc import engine as engine_module
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.worker_group import WorkerFailure
from tests.scheduler_svc.test_engine import (
    ERROR,
    FakeWorkers,
    expected_tokens,
    finished,
    make_engine,
    run_until,
    submit,
)

RESOURCE_EXHAUSTED, UNAVAILABLE = 8, 14


@dataclass
class RecordingWorkers(FakeWorkers):
    """Keeps the timeout of every recv_step, and answers plans that ask for top logprobs with made-up
    alternatives: for the sampled token t, ids t, t+1, ... with logprobs -1, -2, ..."""

    timeouts: list = field(default_factory=list)

    def send_step(self, payload: bytes) -> None:
        super().send_step(payload)
        plan = worker_pb2.WorkerCommand.FromString(payload).step
        result = self.results[-1]
        if plan.num_top_logprobs:
            for token in result.sampled_token_ids:
                result.sampled_logprobs.append(-1.0)
                k = plan.num_top_logprobs
                result.top_logprobs.add(token_ids=[token + i for i in range(k)],
                                        logprobs=[-1.0 - i for i in range(k)])

    def recv_step(self, timeout_s=None, alive=None):
        self.timeouts.append(timeout_s)
        return super().recv_step(timeout_s, alive)


def test_a_full_waiting_queue_refuses_with_resource_exhausted_and_a_retry_hint():
    engine, _ = make_engine(max_num_seqs=1, max_num_waiting=2)
    events = []
    stream = engine.open_stream(events.append)
    # Submitted together: r0 takes the one seat (about to run, not waiting), r1 and r2 wait, and r3
    # finds the queue full.
    for i in range(4):
        engine.submit(stream, submit(f"r{i}", [1, 2, i + 3], 3))
    sent = []

    def later(event):  # once r0 is done and r1 runs, r2 waits alone: there is room again
        events.append(event)
        if not sent and finished(events, {"r0"}):
            sent.append(True)
            engine.submit(stream, submit("r4", [9, 9], 3))

    engine._sinks[stream] = later
    assert run_until(engine, lambda: finished(events, {"r0", "r1", "r2", "r3", "r4"})) is None
    outputs = {o.request_id: o for e in events for o in e.outputs if o.finish_reason}
    refused = outputs["r3"]
    assert (refused.finish_reason, refused.status_code, refused.retry_after_ms) == (
        ERROR, RESOURCE_EXHAUSTED, engine_module.RETRY_AFTER_MS)
    assert "2 sequences are waiting" in refused.error and "--max-num-waiting 2" in refused.error
    assert refused.error_field == ""
    for rid, prompt in (("r0", [1, 2, 3]), ("r1", [1, 2, 4]), ("r2", [1, 2, 5]), ("r4", [9, 9])):
        tokens = [t for e in events for o in e.outputs if o.request_id == rid for t in o.token_ids]
        assert tokens == expected_tokens(prompt, 3), rid
    assert engine.engine_info().stats.num_requests == 0


def test_stop_ends_running_requests_as_shutting_down():
    engine, _ = make_engine()
    events = []

    def sink(event):
        events.append(event)
        if len(events) == 2:
            engine.stop()  # mid-request, from the loop's thread: deterministic

    stream = engine.open_stream(sink)
    engine.submit(stream, submit("long", [1, 2, 3], 100))
    assert run_until(engine, lambda: False) is None
    (last,) = events[-1].outputs
    assert (last.request_id, last.finish_reason, last.status_code, last.error) == (
        "long", ERROR, UNAVAILABLE, "the scheduler is shutting down")
    assert engine.failure is None and engine.done.is_set()
    info = engine.engine_info()
    assert (info.ready, info.stats.num_requests, info.stats.num_free_blocks) == (False, 0, 64)


def test_a_worker_leaving_during_a_stop_is_no_engine_failure():
    engine, workers = make_engine(RecordingWorkers())
    events = []
    stream = engine.open_stream(events.append)

    def fail_after_stop(timeout_s=None, alive=None):
        if engine.stop_requested.is_set():
            raise WorkerFailure("a worker disconnected (its process exited?)")
        return FakeWorkers.recv_step(workers, timeout_s, alive)

    workers.recv_step = fail_after_stop
    engine.submit(stream, submit("r", [1, 2, 3], 100))

    def sink(event):
        events.append(event)
        if len(events) == 2:
            engine.stop()

    engine._sinks[stream] = sink
    assert run_until(engine, lambda: False) is None  # run() did not raise
    assert engine.failure is None
    (last,) = events[-1].outputs
    assert (last.finish_reason, last.status_code) == (ERROR, UNAVAILABLE)
    assert last.error.startswith("the scheduler is shutting down (a worker disconnected")
    assert "engine failed" not in last.error


def test_a_worker_failure_is_unavailable():
    engine, _ = make_engine(FakeWorkers(fail_on_recv=1))
    events = []
    stream = engine.open_stream(events.append)
    engine.submit(stream, submit("r", [1, 2, 3], 8))
    assert isinstance(run_until(engine, lambda: False), WorkerFailure)
    (last,) = events[-1].outputs
    assert (last.finish_reason, last.status_code, last.error) == (
        ERROR, UNAVAILABLE, "engine failed: a worker disconnected (boom)")


@pytest.mark.parametrize("step_timeout, first, later", [(2.5, 900.0, 2.5), (1000.0, 1000.0, 1000.0), (0, None, None)])
def test_the_watchdog_gives_the_first_steps_a_longer_budget(step_timeout, first, later):
    engine, workers = make_engine(RecordingWorkers(), step_timeout=step_timeout)
    events = []
    stream = engine.open_stream(events.append)
    engine.submit(stream, submit("r", [1, 2, 3], 20))
    assert run_until(engine, lambda: finished(events, {"r"})) is None
    warm = engine_module.WARMUP_STEPS
    assert len(workers.timeouts) == 20
    # Planned ahead, step k's result is awaited after step k+1 is planned: the count is one ahead.
    assert workers.timeouts[: warm - 1] == [first] * (warm - 1)
    assert workers.timeouts[warm + 1 :] == [later] * (20 - warm - 1)


def test_top_logprobs_reach_the_requests_that_asked_trimmed_to_their_count():
    engine, _ = make_engine(RecordingWorkers())
    events = []
    stream = engine.open_stream(events.append)
    asks = submit("asks", [1, 2, 3], 3)
    asks.sampling_params.logprobs = True
    asks.sampling_params.top_logprobs = 2
    wider = submit("wider", [4, 5], 3)
    wider.sampling_params.top_logprobs = 4
    engine.submit(stream, asks)
    engine.submit(stream, wider)
    engine.submit(stream, submit("plain", [6, 7], 3))
    assert run_until(engine, lambda: finished(events, {"asks", "wider", "plain"})) is None
    by_request = {}
    for e in events:
        for o in e.outputs:
            by_request.setdefault(o.request_id, []).append(o)
    for o in by_request["asks"]:
        (t,) = o.token_ids
        assert list(o.logprobs) == [-1.0]
        assert [(list(x.token_ids), list(x.logprobs)) for x in o.top_logprobs] == [([t, t + 1], [-1.0, -2.0])]
    for o in by_request["wider"]:
        (t,) = o.token_ids
        assert list(o.logprobs) == [-1.0]  # top_logprobs implies logprobs
        assert [list(x.token_ids) for x in o.top_logprobs] == [[t, t + 1, t + 2, t + 3]]
    assert all(not o.logprobs and not o.top_logprobs for o in by_request["plain"])


def test_a_pool_shorter_than_one_sequence_lowers_the_served_context(capsys):
    engine, _ = make_engine(FakeWorkers(num_blocks=(8,)))  # 8 blocks of 4 tokens; max_model_len 128
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("the KV pool holds 32 tokens, fewer than the model's context of 128: serving "
                                      "max_model_len 32") in err
    assert engine.info.max_model_len == engine.scheduler.max_model_len == 32  # what GetModelInfo reports
    engine, _ = make_engine(FakeWorkers(num_blocks=(32,)))
    assert capsys.readouterr().err == "" and engine.info.max_model_len == 128


def test_an_explicit_max_model_len_the_pool_cannot_hold_refuses_to_start():
    from scheduler_svc.engine import ContextTooLong, served_context

    config = SchedulerConfig(block_size=4, max_model_len=100)
    with pytest.raises(ContextTooLong, match="--max-model-len 100 needs room for 100 tokens, but the KV pool "
                                              "holds 32 tokens"):
        served_context(config, 128, 8)
    assert served_context(config, 128, 25) == 100  # it fits: served as asked
    assert served_context(SchedulerConfig(block_size=4), 128, 8) == 32
