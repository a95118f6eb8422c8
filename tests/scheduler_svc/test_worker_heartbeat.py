"""The workers' liveness heartbeat over real ZeroMQ: a worker whose beats stop (a SIGSTOPped process
stops its heartbeat thread with it) fails the wait in seconds, whatever the step timeout; a long step
whose worker keeps beating does not; an idle engine's ``check`` finds a stall too."""

import threading
import time

import pytest
import zmq

from gpu_worker.heartbeat import HEARTBEAT_SUFFIX, start_heartbeat
from scheduler_svc.worker_group import WorkerFailure, WorkerGroup
from tests.scheduler_svc.test_worker_group import (  # noqa: F401  (fixtures)
    FakeWorker,
    address,
    cache_ready,
    ctx,
    either,
    hello,
    plan,
    step_answer,
)

TIMEOUT_S = 0.6  # the workers beat every 0.1 s here


class FrozenBeat:
    """Beats as rank 0 every 0.1 s until ``freeze()``, then stays connected and silent: a stopped
    process keeps its sockets open (stopping gpu_worker.heartbeat's thread would close its socket, which
    reads as a departed worker)."""

    def __init__(self, context, target):
        self.frozen = threading.Event()
        self.done = threading.Event()
        self.sock = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, b"rank0" + HEARTBEAT_SUFFIX)
        self.sock.connect(target)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.done.wait(0.1):
            if not self.frozen.is_set():
                self.sock.send(b"")

    def freeze(self):
        self.frozen.set()

    def close(self):
        self.done.set()
        self.thread.join(5)
        self.sock.close(0)


@pytest.fixture
def serving(ctx, address):  # noqa: F811
    """serving(step_answer, frozen_beat) -> (group, beat): one rank past InitCache that beats every 0.1 s,
    with gpu_worker.heartbeat's thread or (frozen_beat) a FrozenBeat."""
    made = []

    def make(answer, frozen_beat=False):
        group = WorkerGroup(address, 1, ctx=ctx, heartbeat_timeout=TIMEOUT_S)
        fake = FakeWorker(ctx, address, 0, hello(0), either(cache_ready(0), answer))
        beat = FrozenBeat(ctx, address) if frozen_beat else start_heartbeat(address, b"rank0", 0.1, ctx=ctx)
        made.append((group, fake, beat))
        group.wait_for_hellos(timeout_s=5)
        group.init_cache(4, timeout_s=5)
        return group, beat

    yield make
    for group, fake, beat in made:
        beat.close() if isinstance(beat, FrozenBeat) else beat.set()
        fake.stop()
        group.close()


def test_a_worker_whose_heartbeat_stops_fails_the_step_in_seconds(serving):
    group, beat = serving(lambda cmd: None, frozen_beat=True)  # never answers a step: frozen
    group.send_step(plan(0))
    time.sleep(0.5)
    beat.freeze()  # what SIGSTOP does to the worker's heartbeat thread
    start = time.monotonic()
    with pytest.raises(WorkerFailure, match=r"worker rank0 stalled: no heartbeat for .* s \(stopped or frozen; "
                       r"--heartbeat-timeout 0.6\)"):
        group.recv_step(timeout_s=None)  # no step watchdog at all
    assert TIMEOUT_S - 0.2 < time.monotonic() - start < TIMEOUT_S + 1.0


def test_a_long_step_of_a_beating_worker_is_not_a_stall(serving):
    def slow(cmd):
        time.sleep(TIMEOUT_S * 2)
        return step_answer(0)(cmd)

    group, _ = serving(slow)
    group.send_step(plan(0))
    result = group.recv_step(timeout_s=None)
    assert list(result.sampled_token_ids) == [7]


def test_an_idle_engine_finds_a_stalled_worker(serving):
    group, beat = serving(step_answer(0), frozen_beat=True)
    time.sleep(0.3)
    group.check()  # beating: nothing to report
    beat.freeze()
    start = time.monotonic()
    with pytest.raises(WorkerFailure, match="stalled"):
        while time.monotonic() - start < 10:
            group.check()
            time.sleep(0.05)
    assert time.monotonic() - start < TIMEOUT_S + 1.0


def test_a_closed_heartbeat_socket_is_a_departed_worker(serving):
    group, beat = serving(step_answer(0))
    beat.set()  # the heartbeat thread ends and closes its socket, as at the process's exit
    with pytest.raises(WorkerFailure, match="disconnected"):
        for _ in range(100):
            group.check()
            time.sleep(0.05)


def test_a_reply_read_by_check_is_kept_for_the_next_wait(serving):
    group, _ = serving(step_answer(0))
    group.send_step(plan(0))
    time.sleep(0.3)  # the answer is in before anyone waits for it
    group.check()
    assert list(group.recv_step(timeout_s=5).sampled_token_ids) == [7]
