"""The scheduler's side of the ZeroMQ link to its workers.

One ROUTER socket; each worker connects a DEALER whose identity is ``rank<N>``. Every StepPlan goes to
every rank; every rank answers, and rank 0's answer carries the sampled tokens. A worker that
disconnects (its process died) fails the wait at once, through a socket monitor.

Each worker also beats from a thread of its own (gpu_worker.heartbeat), identity ``rank<N>.heartbeat``,
on the same socket. Once the pool is allocated (start-up may hold a worker's interpreter for long: CUDA
initialization, graph capture; the start-up timeout bounds it), a rank whose beats stop for
``heartbeat_timeout`` seconds is a stalled worker (stopped, frozen): every wait fails as for a dead one,
and ``check`` finds it between steps too, while the engine idles.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

import clients  # noqa: F401
from gpu_worker.heartbeat import HEARTBEAT_SUFFIX
from pagedserve.internal.v1 import worker_pb2


class WorkerFailure(RuntimeError):
    """A worker died, disconnected, failed to start or stopped answering."""


class WorkerGroup:
    def __init__(self, address: str, world_size: int = 1, ctx: zmq.Context | None = None,
                 heartbeat_timeout: float = 0.0) -> None:
        self.world_size = world_size
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_ACCEPTED)
        self.sock.bind(address)
        self.address = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.identities = [f"rank{r}".encode() for r in range(world_size)]
        # Step answers that came before another rank's answer to an earlier step (with two steps in
        # flight a fast rank may answer both), kept per rank in order.
        self._ahead: dict[bytes, deque[worker_pb2.WorkerReply]] = {i: deque() for i in self.identities}
        self._early: deque[tuple[bytes, worker_pb2.WorkerReply]] = deque()  # replies ``check`` read
        self._connected = 0
        self.heartbeat_timeout = heartbeat_timeout  # 0: beats are not watched
        self._beats: dict[bytes, float] = {}  # rank identity -> monotonic time of its last beat
        self._watching = False  # set once the pool is allocated
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)

    def _recv(self, timeout_s: float | None, deadline: float | None, alive: Callable[[], bool] | None = None):
        """Next (identity, WorkerReply); raises WorkerFailure on disconnect, death, a stalled worker, or
        no answer by ``deadline`` (monotonic; the end of a whole wait of ``timeout_s``, however many
        replies it takes)."""
        if self._early:
            return self._early.popleft()
        while True:
            got = self._read(500)
            if got is not None:
                return got
            if alive is not None and not alive():
                raise WorkerFailure("a worker process exited")
            self._check_beats()
            if deadline is not None and time.monotonic() > deadline:
                raise WorkerFailure(f"no answer from the workers within {timeout_s:g} s")

    def _read(self, timeout_ms: int) -> tuple[bytes, worker_pb2.WorkerReply] | None:
        """Waits up to ``timeout_ms`` for socket activity and handles it: a reply is returned; a beat or
        a connection is noted (None); a disconnect or a worker's fatal error raises WorkerFailure."""
        events = dict(self.poller.poll(timeout_ms))
        if self.monitor in events:
            event = recv_monitor_message(self.monitor)
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._connected += 1
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                raise WorkerFailure("a worker disconnected (its process exited?)")
        if self.sock not in events:
            return None
        identity, payload = self.sock.recv_multipart()
        if identity.endswith(HEARTBEAT_SUFFIX):
            self._beats[identity[: -len(HEARTBEAT_SUFFIX)]] = time.monotonic()
            return None
        reply = worker_pb2.WorkerReply.FromString(payload)
        if reply.WhichOneof("kind") == "fatal_error":
            raise WorkerFailure(f"worker {identity.decode()} failed: {reply.fatal_error}")
        return identity, reply

    def _check_beats(self) -> None:
        if not self._watching or not self.heartbeat_timeout:
            return
        now = time.monotonic()
        for identity, last in self._beats.items():
            if now - last > self.heartbeat_timeout:
                raise WorkerFailure(f"worker {identity.decode()} stalled: no heartbeat for {now - last:.1f} s "
                                    f"(stopped or frozen; --heartbeat-timeout {self.heartbeat_timeout:g})")

    def check(self) -> None:
        """Between steps (the engine idles): reads what the workers sent meanwhile, without waiting, and
        raises WorkerFailure for a worker that left, failed or stalled."""
        while self.poller.poll(0):
            got = self._read(0)
            if got is not None:
                self._early.append(got)  # nothing is awaited now: kept for the next wait
        self._check_beats()

    def wait_for_hellos(
        self, timeout_s: float = 600.0, alive: Callable[[], bool] | None = None
    ) -> list[worker_pb2.WorkerHello]:
        hellos: dict[bytes, worker_pb2.WorkerHello] = {}
        deadline = _deadline(timeout_s)
        while len(hellos) < self.world_size:
            identity, reply = self._recv(timeout_s, deadline, alive)
            if reply.WhichOneof("kind") != "hello" or identity not in self.identities:
                raise WorkerFailure(f"unexpected first message from {identity!r}")
            hellos[identity] = reply.hello
        return [hellos[i] for i in self.identities]

    def init_cache(self, num_blocks: int, timeout_s: float = 600.0, alive=None, num_cpu_blocks: int = 0) -> None:
        cmd = worker_pb2.WorkerCommand()
        cmd.init_cache.num_blocks = num_blocks
        cmd.init_cache.num_cpu_blocks = num_cpu_blocks
        self._broadcast(cmd.SerializeToString())
        deadline = _deadline(timeout_s)
        for _ in range(self.world_size):
            _, reply = self._recv(timeout_s, deadline, alive)
            if reply.WhichOneof("kind") != "cache_ready":
                raise WorkerFailure("expected CacheReady")
        # Serving from here on: a worker's beats are watched from now (however long start-up took).
        now = time.monotonic()
        self._beats = dict.fromkeys(self._beats, now)
        self._watching = True

    def _broadcast(self, payload: bytes) -> None:
        for identity in self.identities:
            try:
                self.sock.send_multipart([identity, payload])
            except zmq.ZMQError as exc:
                raise WorkerFailure(f"cannot reach {identity.decode()}: {exc}") from exc

    def send_step(self, plan: bytes) -> None:
        self._broadcast(plan)

    def recv_step(self, timeout_s: float | None = None, alive=None) -> worker_pb2.StepResult:
        """Every rank's answer to the oldest step in flight; returns rank 0's StepResult."""
        replies = {i: q.popleft() for i, q in self._ahead.items() if q}
        deadline = _deadline(timeout_s)  # one bound for the whole step, however many ranks answer first
        while len(replies) < self.world_size:
            identity, reply = self._recv(timeout_s, deadline, alive)
            if identity in replies:
                self._ahead[identity].append(reply)
            else:
                replies[identity] = reply
        errors = []
        for identity in self.identities:
            reply = replies[identity]
            if reply.WhichOneof("kind") != "step_result":
                raise WorkerFailure(f"expected a StepResult from {identity.decode()}")
            if reply.step_result.error:
                errors.append(f"{identity.decode()}: {reply.step_result.error}")
        result = replies[self.identities[0]].step_result
        step_ids = [replies[i].step_result.step_id for i in self.identities]
        if any(step_id != result.step_id for step_id in step_ids):
            raise WorkerFailure(f"the ranks answered different steps: {step_ids}")
        if errors and not result.error:
            result.error = "; ".join(errors)
        return result

    def shutdown(self) -> None:
        cmd = worker_pb2.WorkerCommand()
        cmd.shutdown.SetInParent()
        try:
            for identity in self.identities:
                self.sock.send_multipart([identity, cmd.SerializeToString()], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)


def _deadline(timeout_s: float | None) -> float | None:
    return None if timeout_s is None else time.monotonic() + timeout_s
