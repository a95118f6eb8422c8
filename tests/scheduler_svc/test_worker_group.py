"""WorkerGroup over real ZeroMQ (ipc:// in a temporary directory) against fake workers: DEALER sockets
in threads of this process that say hello and answer each command as a test scripts them."""

import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable

import pytest
import zmq

import clients  # noqa: F401
from pagedserve.internal.v1 import worker_pb2
from scheduler_svc.worker_group import WorkerFailure, WorkerGroup

Answer = Callable[[worker_pb2.WorkerCommand], worker_pb2.WorkerReply | None]


def hello(rank: int, num_blocks: int = 10) -> worker_pb2.WorkerReply:
    return worker_pb2.WorkerReply(hello=worker_pb2.WorkerHello(rank=rank, num_blocks=num_blocks, block_size=16))


def cache_ready(rank: int) -> Answer:
    return lambda cmd: worker_pb2.WorkerReply(cache_ready=worker_pb2.CacheReady(
        rank=rank, num_blocks=cmd.init_cache.num_blocks))


class FakeWorker:
    """A DEALER named ``rank<N>``: sends ``first`` on connecting, then answers every command with
    ``answer(cmd)`` (None: no answer; the string "close": close the socket, as a dying process
    does). Waits ``delay_s`` before each message it sends, to come after faster ranks. Keeps the
    commands it received."""

    def __init__(self, ctx: zmq.Context, address: str, rank: int, first: worker_pb2.WorkerReply | None,
                 answer: Answer | None = None, delay_s: float = 0.0) -> None:
        self.commands: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ctx, address, rank, first, answer, delay_s),
                                        daemon=True)
        self._thread.start()

    def _run(self, ctx, address, rank, first, answer, delay_s) -> None:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, f"rank{rank}".encode())
        sock.setsockopt(zmq.LINGER, 1000)
        sock.connect(address)
        if first is not None:
            time.sleep(delay_s)
            sock.send(first.SerializeToString())
        try:
            while not self._stop.is_set():
                if not sock.poll(20):
                    continue
                cmd = worker_pb2.WorkerCommand.FromString(sock.recv())
                self.commands.put(cmd)
                reply = answer(cmd) if answer is not None else None
                if reply == "close":
                    return
                if reply is not None:
                    time.sleep(delay_s)
                    sock.send(reply.SerializeToString())
        finally:
            sock.close()

    def received(self, n: int) -> list[worker_pb2.WorkerCommand]:
        return [self.commands.get(timeout=5) for _ in range(n)]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def address():
    # ipc paths must stay short (about 100 bytes), so not under pytest's tmp_path
    directory = tempfile.mkdtemp(prefix="wg-")
    yield f"ipc://{directory}/scheduler"
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def start(ctx, address):
    """start(world_size, *workers as (rank, first, answer[, delay_s])) -> (group, fake workers)."""
    made: list = []

    def make(world_size: int, *specs):
        group = WorkerGroup(address, world_size, ctx=ctx)
        fakes = [FakeWorker(ctx, address, *spec) for spec in specs]
        made.append((group, fakes))
        return group, fakes

    yield make
    for group, fakes in made:
        for fake in fakes:
            fake.stop()
        group.close()


def step_answer(rank: int, error: str = "") -> Answer:
    """Answers a step with a result naming the rank (rank 0 also samples token 7 for seq 3)."""

    def answer(cmd):
        result = worker_pb2.StepResult(step_id=cmd.step.step_id, rank=rank, error=error,
                                       timings=worker_pb2.StepTimings(total_ns=100 + rank))
        if rank == 0:
            result.seq_ids.append(3)
            result.sampled_token_ids.append(7)
        return worker_pb2.WorkerReply(step_result=result)

    return answer


def either(*answers: Answer) -> Answer:
    """The first answer for init_cache, the second for steps."""
    return lambda cmd: answers[0](cmd) if cmd.WhichOneof("kind") == "init_cache" else answers[1](cmd)


def plan(step_id: int) -> bytes:
    cmd = worker_pb2.WorkerCommand()
    cmd.step.step_id = step_id
    cmd.step.running_seq_ids.append(3)
    return cmd.SerializeToString()


def test_hellos_come_back_in_rank_order_and_init_cache_reaches_every_rank(start):
    # rank 1's hello arrives first
    group, (r1, r0) = start(2, (1, hello(1, num_blocks=12), cache_ready(1)), (0, hello(0), cache_ready(0), 0.05))
    hellos = group.wait_for_hellos(timeout_s=5)
    assert [(h.rank, h.num_blocks) for h in hellos] == [(0, 10), (1, 12)]
    group.init_cache(7, timeout_s=5, num_cpu_blocks=3)
    for fake in (r0, r1):
        (cmd,) = fake.received(1)
        assert (cmd.init_cache.num_blocks, cmd.init_cache.num_cpu_blocks) == (7, 3)


def test_a_first_message_that_is_not_a_hello_fails(start):
    group, _ = start(1, (0, worker_pb2.WorkerReply(cache_ready=worker_pb2.CacheReady(rank=0))))
    with pytest.raises(WorkerFailure, match="unexpected first message from b'rank0'"):
        group.wait_for_hellos(timeout_s=5)


def test_a_hello_from_a_rank_outside_the_group_fails(start):
    group, _ = start(1, (2, hello(2)))
    with pytest.raises(WorkerFailure, match="unexpected first message from b'rank2'"):
        group.wait_for_hellos(timeout_s=5)


def test_a_fatal_error_names_the_worker(start):
    group, _ = start(1, (0, worker_pb2.WorkerReply(fatal_error="cannot load model.safetensors")))
    with pytest.raises(WorkerFailure, match="worker rank0 failed: cannot load model.safetensors"):
        group.wait_for_hellos(timeout_s=5)


def test_an_answer_other_than_cache_ready_fails_init_cache(start):
    group, _ = start(1, (0, hello(0), step_answer(0)))
    group.wait_for_hellos(timeout_s=5)
    with pytest.raises(WorkerFailure, match="expected CacheReady"):
        group.init_cache(4, timeout_s=5)


def test_every_rank_gets_the_step_and_rank_0_answers_for_the_group(start):
    # rank 0 answers neither first nor last: the group waits for every rank and returns rank 0's result
    group, fakes = start(
        3, (0, hello(0), either(cache_ready(0), step_answer(0)), 0.05),
        (1, hello(1), either(cache_ready(1), step_answer(1))),
        (2, hello(2), either(cache_ready(2), step_answer(2)), 0.1))
    group.wait_for_hellos(timeout_s=5)
    group.init_cache(4, timeout_s=5)
    for step_id in (0, 1):
        group.send_step(plan(step_id))
        result = group.recv_step(timeout_s=5)
        assert (result.step_id, result.rank, list(result.seq_ids), list(result.sampled_token_ids)) == (
            step_id, 0, [3], [7])
        assert result.error == ""
    for fake in fakes:
        init, *steps = fake.received(3)
        assert init.WhichOneof("kind") == "init_cache"
        assert [(s.step.step_id, list(s.step.running_seq_ids)) for s in steps] == [(0, [3]), (1, [3])]


def test_errors_of_other_ranks_are_merged_into_rank_0s_result(start):
    group, _ = start(3, (0, hello(0), step_answer(0)), (1, hello(1), step_answer(1, "out of memory")),
                     (2, hello(2), step_answer(2, "NaN in logits")))
    group.wait_for_hellos(timeout_s=5)
    group.send_step(plan(0))
    result = group.recv_step(timeout_s=5)
    assert result.rank == 0 and list(result.sampled_token_ids) == [7]
    assert sorted(result.error.split("; ")) == ["rank1: out of memory", "rank2: NaN in logits"]


def test_a_worker_that_disconnects_mid_step_fails_the_wait_at_once(start):
    group, _ = start(2, (0, hello(0), step_answer(0)), (1, hello(1), lambda cmd: "close"))
    group.wait_for_hellos(timeout_s=5)
    group.send_step(plan(0))
    begin = time.monotonic()
    with pytest.raises(WorkerFailure, match="a worker disconnected"):
        group.recv_step(timeout_s=30)
    assert time.monotonic() - begin < 5  # the socket monitor tells, not the timeout


def test_a_rank_that_never_connected_cannot_be_sent_a_step(start):
    group, _ = start(1)  # nobody connects: the step has nowhere to go, and says so instead of queueing
    with pytest.raises(WorkerFailure, match="cannot reach rank0"):
        group.send_step(plan(0))


def test_silence_fails_after_the_timeout_and_a_dead_process_at_once(start):
    group, _ = start(1, (0, hello(0)))  # answers nothing after its hello
    group.wait_for_hellos(timeout_s=5)
    group.send_step(plan(0))
    with pytest.raises(WorkerFailure, match="no answer from the workers within 0.1 s"):
        group.recv_step(timeout_s=0.1)
    with pytest.raises(WorkerFailure, match="a worker process exited"):
        group.recv_step(alive=lambda: False)
