"""EngineCore's loop against in-process fake workers (no processes, no sockets): what each stream
receives and in which order, what the workers are told, the ahead-step pipeline, and failures.

The tests talk to the engine only through its public surface (open_stream, submit, abort,
close_stream, run, stop, engine_info) and Submit protos, and read the workers' side from the
StepPlan protos the engine sends, so they do not depend on the scheduler's internal records.
Interactions happen before ``run`` starts or from inside a sink (on the loop's thread), which keeps
every run deterministic although the loop runs in a thread of its own.
"""

import threading
from collections import deque
from dataclasses import dataclass, field

import pytest

import clients  # noqa: F401
from pagedserve.internal.v1 import scheduler_pb2, worker_pb2
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.engine import EngineCore
from scheduler_svc.scheduler import INTERNAL
from scheduler_svc.worker_group import WorkerFailure
from tests.waiting import wait_until

LENGTH = scheduler_pb2.FINISH_REASON_LENGTH
STOP = scheduler_pb2.FINISH_REASON_STOP
ABORT = scheduler_pb2.FINISH_REASON_ABORT
ERROR = scheduler_pb2.FINISH_REASON_ERROR
EOS = 99
VOCAB = 100
TIMINGS = worker_pb2.StepTimings(prepare_ns=100, forward_ns=600, sample_ns=300, total_ns=1000)


def next_token(token_ids: list[int]) -> int:
    """The fake model: the next token depends only on the position, and is never EOS."""
    return 10 + len(token_ids) % 50


def expected_tokens(prompt: list[int], n: int) -> list[int]:
    return [10 + (len(prompt) + i) % 50 for i in range(n)]


@dataclass
class _FakeSeq:
    token_ids: list[int]
    num_computed_tokens: int


@dataclass
class FakeWorkers:
    """A WorkerGroup in process: runs each StepPlan as it is sent (a worker's state advances in plan
    order), queues its StepResult and hands results back first in, first out. Records every plan.

    ``fail_on_recv``: the k-th recv_step (0-based) raises WorkerFailure; ``step_errors``: step_id ->
    error string set on that step's result; ``seq_errors``: (step_id, first prompt token) -> the error
    that sequence's sampling raises in that step (as ModelRunner reports it: in seq_errors, with token 0
    kept on the worker)."""

    num_blocks: tuple[int, ...] = (64,)
    block_size: int = 4
    max_model_len: int = 128
    sample: object = next_token
    fail_on_recv: int | None = None
    step_errors: dict[int, str] = field(default_factory=dict)
    seq_errors: dict[tuple[int, int], str] = field(default_factory=dict)
    plans: list[worker_pb2.StepPlan] = field(default_factory=list)
    init_cache_calls: list[tuple[int, int]] = field(default_factory=list)
    seqs: dict[int, _FakeSeq] = field(default_factory=dict)
    results: deque = field(default_factory=deque)
    num_recvs: int = 0
    max_in_flight: int = 0

    @property
    def world_size(self) -> int:
        return len(self.num_blocks)

    def wait_for_hellos(self, timeout_s, alive=None):
        return [
            worker_pb2.WorkerHello(rank=r, world_size=self.world_size, num_blocks=n, num_cpu_blocks=2 + r,
                                   block_size=self.block_size, max_model_len=self.max_model_len - r,
                                   vocab_size=VOCAB, eos_token_ids=[EOS], architecture="FakeForCausalLM",
                                   dtype="float32")
            for r, n in enumerate(self.num_blocks)
        ]

    def init_cache(self, num_blocks, timeout_s=600.0, alive=None, num_cpu_blocks=0):
        self.init_cache_calls.append((num_blocks, num_cpu_blocks))

    def send_step(self, payload: bytes) -> None:
        plan = worker_pb2.WorkerCommand.FromString(payload).step
        assert plan.step_id == len(self.plans), "plans arrive in step order"
        assert not plan.forks and not plan.copy_src_block_ids, "these tests use plain requests"
        self.plans.append(plan)
        for seq_id in plan.finished_seq_ids:
            del self.seqs[seq_id]
        batch = []
        for new in plan.new_seqs:
            assert new.seq_id not in self.seqs
            self.seqs[new.seq_id] = _FakeSeq(list(new.token_ids), new.num_computed_tokens)
            batch.append((new.seq_id, new.num_scheduled_tokens))
        batch += zip(plan.running_seq_ids, plan.running_num_scheduled_tokens, strict=True)
        result = worker_pb2.StepResult(step_id=plan.step_id, timings=TIMINGS)
        result.error = self.step_errors.get(plan.step_id, "")
        for seq_id, n in batch:
            seq = self.seqs[seq_id]
            seq.num_computed_tokens += n
            assert seq.num_computed_tokens <= len(seq.token_ids)
            if seq.num_computed_tokens == len(seq.token_ids):
                error = self.seq_errors.get((plan.step_id, seq.token_ids[0]))
                if error is not None:
                    result.seq_errors.add(seq_id=seq_id, error=error)
                    seq.token_ids.append(0)
                    continue
                token = self.sample(seq.token_ids)
                seq.token_ids.append(token)
                result.seq_ids.append(seq_id)
                result.sampled_token_ids.append(token)
        self.results.append(result)
        self.max_in_flight = max(self.max_in_flight, len(self.results))

    def check(self) -> None:
        pass

    def recv_step(self, timeout_s=None, alive=None) -> worker_pb2.StepResult:
        assert self.results, "recv_step with no step in flight"
        k, self.num_recvs = self.num_recvs, self.num_recvs + 1
        if k == self.fail_on_recv:
            raise WorkerFailure("a worker disconnected (boom)")
        return self.results.popleft()

    def seq_id_of(self, prompt: list[int]) -> int:
        (seq_id,) = [s.seq_id for p in self.plans for s in p.new_seqs if list(s.token_ids) == prompt]
        return seq_id


def submit(request_id: str, prompt: list[int], max_tokens: int) -> scheduler_pb2.Submit:
    params = scheduler_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0)
    return scheduler_pb2.Submit(request_id=request_id, prompt_token_ids=prompt, sampling_params=params)


def make_engine(workers: FakeWorkers | None = None, **config) -> tuple[EngineCore, FakeWorkers]:
    workers = workers or FakeWorkers()
    config = {"block_size": workers.block_size, "max_num_batched_tokens": 64, "watermark": 0.0, **config}
    return EngineCore(SchedulerConfig(**config), workers), workers


def summary(event: scheduler_pb2.SchedulerEvent) -> tuple:
    return event.step_id, [(o.request_id, list(o.token_ids), o.finish_reason) for o in event.outputs]


def finished(events: list, request_ids: set[str]) -> bool:
    done = {o.request_id for e in list(events) for o in e.outputs if o.finish_reason}
    return request_ids <= done


def run_until(engine: EngineCore, until, timeout_s: float = 20.0) -> BaseException | None:
    """Runs the loop in a thread until ``until()`` holds or the loop ends; stops it; returns what
    run() raised, if anything."""
    raised: list[BaseException] = []

    def target():
        try:
            engine.run()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    wait_until(lambda: until() or not thread.is_alive(), timeout_s, what="the engine to get there")
    engine.stop()
    thread.join(timeout_s)
    assert not thread.is_alive(), "the loop did not stop"
    return raised[0] if raised else None


def test_engine_info_takes_the_smallest_sizes_of_the_hellos():
    engine, workers = make_engine(FakeWorkers(num_blocks=(40, 32)), enable_prefix_caching=False)
    assert workers.init_cache_calls == [(32, 2)]  # every rank gets the smallest pool, CPU swap too
    info = engine.engine_info()
    assert (info.architecture, info.max_model_len, info.vocab_size, info.block_size) == ("FakeForCausalLM", 127,
                                                                                      VOCAB, 4)
    assert (info.num_blocks, info.num_cpu_blocks, info.world_size, list(info.eos_token_ids)) == (32, 2, 2, [EOS])
    assert (info.ready, info.enable_prefix_caching, info.dtype) == (True, False, "float32")
    assert (info.stats.num_free_blocks, info.stats.num_requests, info.stats.num_steps) == (32, 0, 0)


def test_workers_that_disagree_or_have_no_memory_are_refused():
    with pytest.raises(RuntimeError, match="disagree on block_size"):
        EngineCore(SchedulerConfig(block_size=8), FakeWorkers(block_size=4))
    with pytest.raises(RuntimeError, match="no memory left"):
        EngineCore(SchedulerConfig(block_size=4), FakeWorkers(num_blocks=(8, 0)))


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_one_event_per_stream_per_step_in_step_order(async_scheduling):
    engine, workers = make_engine(async_scheduling=async_scheduling)
    events = {"a": [], "b": []}
    stream_a = engine.open_stream(events["a"].append)
    stream_b = engine.open_stream(events["b"].append)
    prompts = {"a1": [1, 2, 3], "a2": [4, 5, 6, 7, 8], "b1": [9, 10]}
    engine.submit(stream_a, submit("a1", prompts["a1"], 3))
    engine.submit(stream_a, submit("a2", prompts["a2"], 5))
    engine.submit(stream_b, submit("b1", prompts["b1"], 4))
    assert run_until(engine, lambda: finished(events["a"], {"a1", "a2"}) and finished(events["b"], {"b1"})) is None

    tok = {r: expected_tokens(p, 5) for r, p in prompts.items()}
    # All three prefill in step 0 and sample there; then one token per step until max_tokens.
    assert [summary(e) for e in events["a"]] == [
        (0, [("a1", tok["a1"][:1], 0), ("a2", tok["a2"][:1], 0)]),
        (1, [("a1", tok["a1"][1:2], 0), ("a2", tok["a2"][1:2], 0)]),
        (2, [("a1", tok["a1"][2:3], LENGTH), ("a2", tok["a2"][2:3], 0)]),
        (3, [("a2", tok["a2"][3:4], 0)]),
        (4, [("a2", tok["a2"][4:5], LENGTH)]),
    ]
    assert [summary(e) for e in events["b"]] == [
        (0, [("b1", tok["b1"][:1], 0)]), (1, [("b1", tok["b1"][1:2], 0)]), (2, [("b1", tok["b1"][2:3], 0)]),
        (3, [("b1", tok["b1"][3:4], LENGTH)]),
    ]
    assert [o.num_prompt_tokens for e in events["a"][:1] for o in e.outputs] == [3, 5]

    # Step 0 prefills the three prompts; steps 1-4 decode whoever is still running.
    assert [sorted(len(s.token_ids) for s in p.new_seqs) for p in workers.plans] == [[2, 3, 5], [], [], [], []]
    assert [len(p.running_seq_ids) for p in workers.plans] == [0, 3, 3, 2, 1]
    stats = engine.engine_info().stats
    # With async scheduling every decode step is planned while the one before it runs: two in flight.
    assert (stats.num_steps, stats.num_ahead_steps, workers.max_in_flight) == (
        (5, 4, 2) if async_scheduling else (5, 0, 1))
    assert (stats.worker_total_ns, stats.worker_forward_ns, stats.worker_sample_ns, stats.worker_prepare_ns) == (
        5000, 3000, 1500, 500)
    assert stats.num_decode_steps == 4 and stats.decode_step_wall_ns > 0
    assert (stats.num_free_blocks, stats.num_requests, stats.num_running) == (64, 0, 0)
    # A finished sequence is dropped on the workers by the next plan made after its end is known. With
    # async scheduling that is one step later (plan 3 was made while step 2 ran), and b1's drop waits
    # for a plan that never comes; a2 ends with the last step either way.
    a1, b1 = workers.seq_id_of(prompts["a1"]), workers.seq_id_of(prompts["b1"])
    assert [list(p.finished_seq_ids) for p in workers.plans] == (
        [[], [], [], [], [a1]] if async_scheduling else [[], [], [], [a1], [b1]])


def test_a_stop_token_ends_the_request_and_the_extra_ahead_token_is_dropped():
    # The fake samples EOS as the third output of the 2-token prompt: position 4.
    workers = FakeWorkers(sample=lambda ids: EOS if len(ids) == 4 else next_token(ids))
    engine, workers = make_engine(workers)
    events = []
    stream = engine.open_stream(events.append)
    engine.submit(stream, submit("r", [1, 2], 10))
    assert run_until(engine, lambda: finished(events, {"r"})) is None
    outputs = [(list(o.token_ids), o.finish_reason) for e in events for o in e.outputs]
    assert outputs == [([12], 0), ([13], 0), ([EOS], STOP)]
    # The step after the EOS was already planned (async), so the workers computed one more token;
    # nothing of it reached the stream, and the sequence was dropped on the workers afterwards.
    assert len(workers.plans) == 4 and list(workers.plans[3].running_seq_ids) == [workers.seq_id_of([1, 2])]
    assert (engine.engine_info().stats.num_requests, engine.engine_info().stats.num_free_blocks) == (0, 64)


def test_submit_then_abort_in_one_batch_never_reaches_the_workers():
    engine, workers = make_engine()
    events = []
    stream = engine.open_stream(events.append)
    engine.submit(stream, submit("x", [1, 2, 3], 5))
    engine.abort(stream, "x")
    engine.abort(stream, "unknown")  # ignored: no event
    engine.submit(stream, submit("y", [4, 5], 2))
    assert run_until(engine, lambda: finished(events, {"x", "y"})) is None
    y = expected_tokens([4, 5], 2)
    assert [summary(e) for e in events] == [
        (0, [("x", [], ABORT)]), (0, [("y", y[:1], 0)]), (1, [("y", y[1:], LENGTH)])]
    assert [list(s.token_ids) for p in workers.plans for s in p.new_seqs] == [[4, 5]]


def test_abort_mid_run_ends_the_stream_of_tokens_and_frees_the_workers_state():
    engine, workers = make_engine()
    events = []

    def sink(event):
        events.append(event)
        if any(o.request_id == "long" for o in event.outputs) and len(events) == 1:
            engine.abort(stream, "long")

    stream = engine.open_stream(sink)
    engine.submit(stream, submit("long", [1, 2, 3], 50))
    engine.submit(stream, submit("short", [4, 5], 6))
    assert run_until(engine, lambda: finished(events, {"long", "short"})) is None

    long_outputs = [(list(o.token_ids), o.finish_reason) for e in events for o in e.outputs if o.request_id == "long"]
    *tokens, last = long_outputs
    assert last == ([], ABORT)
    assert [t for ids, reason in tokens for t in ids] == expected_tokens([1, 2, 3], len(tokens))
    # Step 1 was in flight when event 0 went out, and its result is applied before the loop reads the
    # abort: two tokens, then the abort, then nothing.
    assert [reason for _, reason in tokens] == [0, 0]
    short = [t for e in events for o in e.outputs if o.request_id == "short" for t in o.token_ids]
    assert short == expected_tokens([4, 5], 6)
    seq_id = workers.seq_id_of([1, 2, 3])
    (drop_step,) = [p.step_id for p in workers.plans if seq_id in p.finished_seq_ids]
    assert all(seq_id not in p.running_seq_ids for p in workers.plans[drop_step:])
    assert engine.engine_info().stats.num_free_blocks == 64


def test_closed_stream_gets_no_more_events_and_its_requests_end():
    engine, workers = make_engine()
    events = {"a": [], "b": [], "c": []}

    def sink_a(event):
        events["a"].append(event)
        engine.close_stream(stream_a)  # after the first event

    stream_a = engine.open_stream(sink_a)
    stream_b = engine.open_stream(events["b"].append)
    stream_c = engine.open_stream(events["c"].append)
    engine.submit(stream_a, submit("r", [1, 2, 3], 20))
    engine.submit(stream_b, submit("r", [4, 5], 4))  # the same request id on another stream is another request
    engine.submit(stream_c, submit("c", [6, 7], 4))
    engine.close_stream(stream_c)  # closed before the loop starts: c never runs
    assert run_until(engine, lambda: finished(events["b"], {"r"})) is None

    assert [summary(e) for e in events["a"]] == [(0, [("r", expected_tokens([1, 2, 3], 1), 0)])]
    assert [t for e in events["b"] for o in e.outputs for t in o.token_ids] == expected_tokens([4, 5], 4)
    assert events["c"] == []
    assert [list(s.token_ids) for p in workers.plans for s in p.new_seqs] == [[1, 2, 3], [4, 5]]
    seq_id = workers.seq_id_of([1, 2, 3])
    assert any(seq_id in p.finished_seq_ids for p in workers.plans)
    info = engine.engine_info()
    assert (info.stats.num_requests, info.stats.num_free_blocks) == (0, 64)


def test_an_invalid_or_duplicate_submit_is_answered_on_its_stream_only():
    engine, _ = make_engine()
    events, other = [], []
    stream = engine.open_stream(events.append)
    engine.open_stream(other.append)
    engine.submit(stream, submit("bad", [1, VOCAB], 4))
    engine.submit(stream, submit("ok", [1, 2], 30))
    engine.submit(stream, submit("ok", [3, 4], 4))
    assert run_until(engine, lambda: finished(events, {"bad"}) and len(events) >= 2) is None
    first = events[0]
    assert [(o.request_id, o.finish_reason, o.error_field, o.num_prompt_tokens) for o in first.outputs] == [
        ("bad", ERROR, "prompt", 2), ("ok", ERROR, "request_id", 2)]
    assert "outside the vocabulary" in first.outputs[0].error and "already running" in first.outputs[1].error
    assert other == []


def test_a_worker_failure_fails_every_request_and_ends_the_loop():
    # One sequence at a time: "r2" is still waiting when the workers fail on step 1.
    engine, workers = make_engine(FakeWorkers(fail_on_recv=1), max_num_seqs=1)
    events = []
    stream = engine.open_stream(events.append)
    engine.submit(stream, submit("r1", [1, 2, 3], 8))
    engine.submit(stream, submit("r2", [4, 5], 8))
    raised = run_until(engine, lambda: False)  # returns once the loop has ended by itself
    assert isinstance(raised, WorkerFailure) and engine.failure is raised
    assert [summary(e) for e in events] == [
        (0, [("r1", expected_tokens([1, 2, 3], 1), 0)]),
        (0, [("r1", [], ERROR), ("r2", [], ERROR)]),
    ]
    assert {o.error for o in events[1].outputs} == {"engine failed: a worker disconnected (boom)"}
    assert engine.engine_info().stats.num_requests == 0


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on():
    engine, workers = make_engine(FakeWorkers(step_errors={1: "CUDA out of memory"}))
    events = []

    def sink(event):
        events.append(event)
        if any(o.request_id == "r1" and o.finish_reason == ERROR for o in event.outputs):
            engine.submit(stream, submit("r2", [4, 5], 3))

    stream = engine.open_stream(sink)
    engine.submit(stream, submit("r1", [1, 2, 3], 8))
    assert run_until(engine, lambda: finished(events, {"r1", "r2"})) is None
    r1 = [(list(o.token_ids), o.finish_reason, o.error) for e in events for o in e.outputs if o.request_id == "r1"]
    assert r1 == [(expected_tokens([1, 2, 3], 1), 0, ""), ([], ERROR, "step failed on a worker: CUDA out of memory")]
    r2 = [t for e in events for o in e.outputs if o.request_id == "r2" for t in o.token_ids]
    assert r2 == expected_tokens([4, 5], 3)
    info = engine.engine_info()
    assert (info.stats.num_requests, info.stats.num_free_blocks) == (0, 64)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_sequence_whose_sampling_failed_on_the_worker_fails_its_request_alone(async_scheduling):
    # Step 2 samples for both requests; r1's row raises on the worker, r2's does not.
    workers = FakeWorkers(seq_errors={(2, 1): "ValueError: a row that cannot be sampled"})
    engine, _ = make_engine(workers, async_scheduling=async_scheduling)
    events = []
    stream = engine.open_stream(events.append)
    engine.submit(stream, submit("r1", [1, 2, 3], 8))
    engine.submit(stream, submit("r2", [4, 5], 6))
    assert run_until(engine, lambda: finished(events, {"r1", "r2"})) is None
    r1 = [(list(o.token_ids), o.finish_reason, o.error, o.status_code)
          for e in events for o in e.outputs if o.request_id == "r1"]
    assert r1[:-1] == [([t], 0, "", 0) for t in expected_tokens([1, 2, 3], 2)]
    assert r1[-1] == ([], ERROR, "the worker could not sample this request: ValueError: a row that cannot be "
                      "sampled", INTERNAL)
    r2 = [t for e in events for o in e.outputs if o.request_id == "r2" for t in o.token_ids]
    assert r2 == expected_tokens([4, 5], 6)
    info = engine.engine_info()
    assert (info.stats.num_requests, info.stats.num_free_blocks) == (0, 64)
    assert engine.failure is None
