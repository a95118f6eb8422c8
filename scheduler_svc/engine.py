"""The engine loop of the scheduler process: take requests, schedule a step, run it on the workers,
publish one batched event per stream.

Requests and aborts arrive from gRPC threads through ``inbox``; the loop alone touches the scheduler.

Steps are pipelined where the data allow: while the workers run step N, the loop plans step N+1
(``Scheduler.schedule_ahead``) and sends it before reading N's results, so the workers start N+1 as
soon as N is done instead of waiting for the scheduler's update, the next schedule and the round
trip. At most two steps are in flight; results are applied in order.

The loop also keeps ``load``, a snapshot of what routers need (requests running and waiting, free blocks,
prefix-cache counters), retaken at most every ``LOAD_INTERVAL_NS`` while busy and once more before it
idles; the Connect streams carry it to the gateways and ``on_load`` feeds the metrics.

A step watchdog: the workers must answer a step within ``step_timeout`` seconds (the first steps get
at least WARMUP_STEP_TIMEOUT_S: kernels may compile on them); a worker that does not is treated like
a dead one, and the engine fails every request (UNAVAILABLE at the gateway) and stops. A stalled worker
process (stopped, frozen) is caught sooner, busy or idle, when its heartbeat stops for
``heartbeat_timeout`` seconds (scheduler_svc.worker_group); a long honest step keeps beating.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass

import clients  # noqa: F401
from gpu_worker import log
from gpu_worker.sampling_params import InvalidField, SamplingParams
from pagedserve.internal.v1 import scheduler_pb2
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.engine_stats import StepTimes, engine_stats
from scheduler_svc.kv_events import KVEventLog
from scheduler_svc.request import (
    FinishReason,
    QueueFull,
    SeqOutput,
    SeqStatus,
    print_request_failure,
)
from scheduler_svc.scheduler import INTERNAL, Scheduler
from scheduler_svc.step_plan import decode_result, encode_step
from scheduler_svc.worker_group import WorkerFailure, WorkerGroup

EventSink = Callable[[scheduler_pb2.SchedulerEvent], None]
LOAD_INTERVAL_NS = 100_000_000

# google.rpc.Code values carried in RequestOutput.status_code.
RESOURCE_EXHAUSTED = 8
UNAVAILABLE = 14
SHUTTING_DOWN = "the scheduler is shutting down"
RETRY_AFTER_MS = 1000  # the hint sent with a full queue: about how long a batch of requests takes to move
WARMUP_STEPS = 8  # steps that get WARMUP_STEP_TIMEOUT_S: the first of each shape may compile kernels
WARMUP_STEP_TIMEOUT_S = 900.0


@dataclass(slots=True)
class _Submit:
    stream_id: int
    submit: scheduler_pb2.Submit


@dataclass(slots=True)
class _Abort:
    stream_id: int
    request_id: str


@dataclass(slots=True)
class _CloseStream:
    stream_id: int


class ContextTooLong(RuntimeError):
    """--max-model-len asks for a context that the KV pool cannot hold one sequence of."""


def served_context(config: SchedulerConfig, model_len: int, num_blocks: int) -> int:
    """The context length this engine serves: the model's (or --max-model-len's), lowered to what the KV
    pool holds when --max-model-len is not given, so that any request that fits the context can run
    alone on an empty engine. An explicit --max-model-len the pool cannot hold refuses to start."""
    capacity = num_blocks * config.block_size
    wanted = min(model_len, config.max_model_len or model_len)
    if capacity >= wanted:
        return wanted
    if config.max_model_len is not None:
        raise ContextTooLong(
            f"--max-model-len {config.max_model_len} needs room for {wanted} tokens, but the KV pool holds "
            f"{capacity} tokens: give the workers more memory (--kv-cache-memory, --gpu-memory-utilization) or "
            f"lower --max-model-len (leave it out to serve the {capacity} tokens the pool holds)")
    print(f"scheduler: the KV pool holds {capacity} tokens, fewer than the model's context of {model_len}: "
          f"serving max_model_len {capacity} (give the workers more memory, e.g. --kv-cache-memory, to serve more)",
          file=sys.stderr, flush=True)
    return capacity


class EngineCore:
    def __init__(self, config: SchedulerConfig, workers: WorkerGroup, alive=None, startup_timeout_s=600.0,
                 on_load: Callable[[scheduler_pb2.EngineLoad], None] | None = None):
        self.config = config
        self.workers = workers
        self.alive = alive
        hellos = workers.wait_for_hellos(startup_timeout_s, alive)
        num_blocks = min(h.num_blocks for h in hellos)
        if num_blocks < 1:
            raise RuntimeError("the workers have no memory left for even one KV block")
        if any(h.block_size != config.block_size for h in hellos):
            raise RuntimeError("workers and scheduler disagree on block_size")
        num_cpu_blocks = min(h.num_cpu_blocks for h in hellos)
        workers.init_cache(num_blocks, startup_timeout_s, alive, num_cpu_blocks=num_cpu_blocks)
        first = hellos[0]
        self.kv_events = None
        if config.kv_events_endpoint:
            # Imported only here: msgpack is needed only where events are on.
            from scheduler_svc.kv_events_publisher import KVEventPublisher

            self.kv_events = KVEventPublisher(config.kv_events_endpoint, config.kv_events_topic)
        self.scheduler = Scheduler(
            config, num_blocks, served_context(config, min(h.max_model_len for h in hellos), num_blocks),
            list(first.eos_token_ids),
            vocab_size=first.vocab_size, num_cpu_blocks=num_cpu_blocks,
            kv_events=KVEventLog(config.block_size) if self.kv_events is not None else None,
        )
        self.info = scheduler_pb2.EngineInfo(
            architecture=first.architecture,
            max_model_len=self.scheduler.max_model_len,
            vocab_size=first.vocab_size,
            block_size=config.block_size,
            num_blocks=num_blocks,
            dtype=first.dtype,
            eos_token_ids=first.eos_token_ids,
            ready=True,
            world_size=workers.world_size,
            num_cpu_blocks=num_cpu_blocks,
            enable_prefix_caching=config.enable_prefix_caching,
        )
        self.times = StepTimes()
        self._unpublished: tuple[int, list[SeqOutput]] | None = None
        self._in_flight: deque[tuple[object, int]] = deque()  # (SchedulerOutput, send time) sent, not applied
        self._last_result_ns = 0
        self.inbox: queue.Queue = queue.Queue()
        self._sinks: dict[int, EventSink] = {}
        self._sinks_lock = threading.Lock()
        self._next_stream_id = 0
        self.stopped = threading.Event()
        self.stop_requested = threading.Event()  # stop() was called: a worker leaving now is no failure
        self.done = threading.Event()  # run() has returned: every request has had its last event
        self.failure: BaseException | None = None
        # Replaced, never mutated, by the loop; read by the stream threads (load_version tells them apart).
        self.load = scheduler_pb2.EngineLoad(num_blocks=num_blocks, num_free_blocks=num_blocks)
        self.load_version = 0
        self.on_load = on_load
        self._next_load_ns = 0

    # ---- called from other threads

    def open_stream(self, sink: EventSink) -> int:
        with self._sinks_lock:
            stream_id = self._next_stream_id
            self._next_stream_id += 1
            self._sinks[stream_id] = sink
        return stream_id

    def submit(self, stream_id: int, submit: scheduler_pb2.Submit) -> None:
        self.inbox.put(_Submit(stream_id, submit))

    def abort(self, stream_id: int, request_id: str) -> None:
        self.inbox.put(_Abort(stream_id, request_id))

    def close_stream(self, stream_id: int) -> None:
        """Aborts everything the stream submitted; no more events go to it."""
        self.inbox.put(_CloseStream(stream_id))

    def engine_info(self) -> scheduler_pb2.EngineInfo:
        info = scheduler_pb2.EngineInfo()
        info.CopyFrom(self.info)
        info.stats.CopyFrom(engine_stats(self.scheduler, self.times))
        info.ready = not self.stopped.is_set()
        return info

    # ---- the loop

    def run(self) -> None:
        """Runs until stop() or a worker failure (kept in ``failure``; every request is then failed).
        After stop(), requests still running end with UNAVAILABLE ("shutting down")."""
        if self.on_load is not None:
            self.on_load(self.load)  # the idle engine's, before anything changes it
        self._publish_kv_events()  # AllBlocksCleared: the fresh pool
        try:
            while not self.stopped.is_set():
                busy = self.scheduler.has_work() or bool(self._in_flight)
                if not busy:
                    self._flush()
                    self._take_load()  # the settled state, before waiting for work
                    self.workers.check()  # a worker that stalls or leaves while the engine idles
                self._drain_inbox(block=not busy)
                if self.scheduler.has_work() or self._in_flight:
                    self.step()
                    if time.perf_counter_ns() >= self._next_load_ns:
                        self._take_load()
            while self._in_flight:  # stopped with a step planned ahead: apply it, leave the workers idle
                self.step()
            self._flush()
            self._fail_all(SHUTTING_DOWN)
        except WorkerFailure as exc:
            if not self.stop_requested.is_set():
                self._fail(exc)
                raise
            self._fail_all(f"{SHUTTING_DOWN} ({exc})")  # the service is stopping: its workers went first
        except BaseException as exc:  # anything else ends the engine too: fail everything, loudly
            self._fail(exc)
            raise
        finally:
            if self.kv_events is not None:
                self.kv_events.close()
            self.stopped.set()
            self.done.set()

    def _fail(self, exc: BaseException) -> None:
        self.failure = exc
        self._fail_all(f"engine failed: {exc}")

    def stop(self) -> None:
        self.stop_requested.set()
        self.stopped.set()
        self.inbox.put(None)

    def _step_timeout(self) -> float | None:
        """Seconds the workers get to answer the step now awaited (None: no watchdog)."""
        timeout = self.config.step_timeout
        if not timeout:
            return None
        if self.scheduler.stats.num_steps <= WARMUP_STEPS:
            return max(timeout, WARMUP_STEP_TIMEOUT_S)
        return timeout

    def step(self) -> None:
        """Applies the oldest step in flight; first sends a step if none is, and the one after it if
        it can be planned ahead."""
        if not self._in_flight:
            out = self.scheduler.schedule()  # may be empty after preemption: it still carries the drops
            self._send(out)
        if self.config.async_scheduling and not self.stopped.is_set():
            ahead = self.scheduler.schedule_ahead(self._in_flight[-1][0])
            if ahead is not None:
                self._send(ahead)
        self._flush()  # the previous step's outputs go out while the workers run this one
        out, sent_ns = self._in_flight.popleft()
        result = self.workers.recv_step(timeout_s=self._step_timeout(), alive=self.alive)
        self.times.add(out, result.timings, time.perf_counter_ns() - max(sent_ns, self._last_result_ns))
        self._last_result_ns = time.perf_counter_ns()
        if result.error:
            outputs = [self._fail_seq(s.seq, f"step failed on a worker: {result.error}")
                       for s in out.new_seqs + out.running if s.seq.status is not SeqStatus.FINISHED]
        else:
            decoded = decode_result(result)
            outputs = self.scheduler.update(out, decoded.sampled, decoded.logprobs, decoded.top,
                                            decoded.prompt_logprobs, decoded.seq_errors)
        self._unpublished = (out.step_id, outputs)
        self._publish_kv_events()

    def _publish_kv_events(self) -> None:
        """Sends what the prefix cache stored and evicted since the last call (scheduling and results)."""
        if self.kv_events is not None:
            self.kv_events.publish(self.scheduler.pool.events.drain())

    def _take_load(self) -> None:
        s = self.scheduler
        running = {id(seq.request) for seq in s.running}
        load = scheduler_pb2.EngineLoad(
            num_requests_running=len(running),
            num_requests_waiting=len({id(seq.request) for seq in s.waiting} - running),
            num_free_blocks=s.pool.num_free_blocks,
            num_blocks=self.info.num_blocks,
            prefix_cache_queries=s.stats.num_queried_prompt_tokens,
            prefix_cache_hits=s.stats.num_cached_prompt_tokens,
            num_preemptions=s.stats.num_preemptions,
            num_requests_swapped=len({id(seq.request) for seq in s.swapped}),
        )
        self._next_load_ns = time.perf_counter_ns() + LOAD_INTERVAL_NS
        if load != self.load:
            self.load = load
            self.load_version += 1
            if self.on_load is not None:
                self.on_load(load)

    def _send(self, out) -> None:
        self.workers.send_step(encode_step(out))
        self._in_flight.append((out, time.perf_counter_ns()))

    def _flush(self) -> None:
        """Publishes the last step's outputs if they have not gone out yet (keeps events in order)."""
        if self._unpublished is not None:
            step_id, outputs = self._unpublished
            self._unpublished = None
            self._publish(step_id, outputs)

    def _drain_inbox(self, block: bool) -> None:
        outputs: list[SeqOutput] = []
        errors: list[tuple[int, scheduler_pb2.RequestOutput]] = []
        while True:
            try:
                item = self.inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                break
            block = False
            if item is None:
                break
            if isinstance(item, _Submit):
                rejected = self._add(item)
                if rejected is not None:
                    errors.append((item.stream_id, rejected))
            elif isinstance(item, _Abort):
                outputs += self.scheduler.abort_request(item.stream_id, item.request_id)
            elif isinstance(item, _CloseStream):
                with self._sinks_lock:
                    self._sinks.pop(item.stream_id, None)
                self.scheduler.abort_stream(item.stream_id)
        if outputs or errors:
            self._flush()
            self._publish(0, outputs, errors)

    def _add(self, item: _Submit) -> scheduler_pb2.RequestOutput | None:
        sub = item.submit
        try:
            params = SamplingParams.from_proto(sub.sampling_params)  # the process edge: decoded once
            self.scheduler.add_request(item.stream_id, sub.request_id, list(sub.prompt_token_ids), params)
        except InvalidField as exc:
            return scheduler_pb2.RequestOutput(
                request_id=sub.request_id,
                finish_reason=FinishReason.ERROR,
                error=exc.reason,  # with error_field the reason alone: each receiver names the field its own way
                error_field=exc.field,
                num_prompt_tokens=len(sub.prompt_token_ids),
            )
        except QueueFull as exc:
            return scheduler_pb2.RequestOutput(
                request_id=sub.request_id,
                finish_reason=FinishReason.ERROR,
                error=str(exc),
                status_code=RESOURCE_EXHAUSTED,
                retry_after_ms=RETRY_AFTER_MS,
                num_prompt_tokens=len(sub.prompt_token_ids),
            )
        except Exception as exc:  # a bug that one request's data reached: that request fails, not the engine
            print_request_failure(sub.request_id, exc)
            return scheduler_pb2.RequestOutput(
                request_id=sub.request_id,
                finish_reason=FinishReason.ERROR,
                error=f"the scheduler could not accept this request: {log.describe_exception(exc)}",
                status_code=INTERNAL,
                num_prompt_tokens=len(sub.prompt_token_ids),
            )
        return None

    def _fail_seq(self, seq, message: str, status_code: int = 0) -> SeqOutput:
        out = self.scheduler.finish(seq, FinishReason.ERROR)
        out.error = message
        out.status_code = status_code
        return out

    def _fail_all(self, message: str) -> None:
        """Ends every request with ``message`` (UNAVAILABLE: the engine is going away, not the request)."""
        s = self.scheduler
        outputs = [self._fail_seq(seq, message, UNAVAILABLE) for seq in [*s.running, *s.waiting, *s.swapped]
                   if seq.status is not SeqStatus.FINISHED]  # an error ends a whole group at once
        self._flush()
        self._publish(0, outputs)

    def _publish(self, step_id: int, outputs: list[SeqOutput], extra=()) -> None:
        by_stream: dict[int, scheduler_pb2.SchedulerEvent] = defaultdict(
            lambda: scheduler_pb2.SchedulerEvent(step_id=step_id)
        )
        for o in outputs:
            request = o.seq.request
            by_stream[request.stream_id].outputs.add(
                request_id=request.request_id,
                index=o.seq.index,
                token_ids=o.token_ids,
                logprobs=o.logprobs,
                finish_reason=o.finish_reason,
                num_prompt_tokens=len(request.prompt_token_ids),
                num_cached_tokens=request.num_cached_tokens,
                error=o.error,
                error_field=o.error_field,
                final_token_ids=o.final_token_ids,
                status_code=o.status_code,
            )
            if o.prompt_logprobs is not None:
                by_stream[request.stream_id].outputs[-1].prompt_logprobs.CopyFrom(o.prompt_logprobs)
            if o.top_logprobs:
                top = by_stream[request.stream_id].outputs[-1].top_logprobs
                for ids, lps in o.top_logprobs:
                    top.add(token_ids=ids, logprobs=lps)
        for stream_id, output in extra:
            by_stream[stream_id].outputs.append(output)
        with self._sinks_lock:
            sinks = [(self._sinks.get(sid), event) for sid, event in by_stream.items()]
        for sink, event in sinks:
            if sink is not None:
                sink(event)
