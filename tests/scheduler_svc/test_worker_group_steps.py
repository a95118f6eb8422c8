"""WorkerGroup with two ranks over real ZeroMQ sockets: with two steps in flight a fast rank may answer
both before a slow rank answers the first; each recv_step still pairs the ranks' answers to one step."""

import pytest
import zmq

import clients  # noqa: F401

# isort: split
from pagedserve.internal.v1 import worker_pb2
from scheduler_svc.worker_group import WorkerFailure, WorkerGroup


def _answer(sock: zmq.Socket, rank: int, step_id: int, error: str = "") -> None:
    result = worker_pb2.StepResult(step_id=step_id, rank=rank, sampled_token_ids=[100 * rank + step_id], error=error)
    sock.send(worker_pb2.WorkerReply(step_result=result).SerializeToString())


def _two_ranks(tmp_path):
    """A WorkerGroup of two and a DEALER socket in the place of each rank's worker."""
    ctx = zmq.Context()
    group = WorkerGroup(f"ipc://{tmp_path}/w.sock", world_size=2, ctx=ctx)
    ranks = []
    for r in range(2):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, f"rank{r}".encode())
        sock.connect(group.address)
        ranks.append(sock)
    return ctx, group, ranks


def _close(ctx, group, ranks) -> None:
    for sock in ranks:
        sock.close(0)
    group.close()
    ctx.term()


def test_answers_are_paired_by_step_not_by_arrival(tmp_path):
    ctx, group, ranks = _two_ranks(tmp_path)
    try:
        _answer(ranks[1], 1, 7)
        _answer(ranks[1], 1, 8, error="boom")  # rank 1 is a step ahead
        _answer(ranks[0], 0, 7)
        _answer(ranks[0], 0, 8)
        first, second = group.recv_step(timeout_s=10), group.recv_step(timeout_s=10)
        assert (first.step_id, list(first.sampled_token_ids), first.error) == (7, [7], "")
        assert (second.step_id, list(second.sampled_token_ids), second.error) == (8, [8], "rank1: boom")
        _answer(ranks[0], 0, 9)
        _answer(ranks[1], 1, 10)
        with pytest.raises(WorkerFailure, match=r"different steps: \[9, 10\]"):
            group.recv_step(timeout_s=10)
    finally:
        _close(ctx, group, ranks)


def test_a_step_waits_for_a_stuck_rank_no_longer_than_its_timeout(tmp_path):
    """Replies of the fast rank (to this step and ahead) do not restart the wait for the stuck one."""
    import threading
    import time

    ctx, group, ranks = _two_ranks(tmp_path)

    done = threading.Event()

    def fast_rank():  # answers this step and the next ones, one every 0.6 s; rank 1 never answers
        step_id = 1
        while not done.is_set():
            _answer(ranks[0], 0, step_id)
            step_id += 1
            done.wait(0.6)

    sender = threading.Thread(target=fast_rank)
    try:
        start = time.monotonic()
        sender.start()
        with pytest.raises(WorkerFailure, match="no answer from the workers within 1 s"):
            group.recv_step(timeout_s=1.0)
        assert time.monotonic() - start < 1.0 + 0.5 + 0.3  # the timeout, one poll interval, slack
    finally:
        done.set()
        sender.join()
        _close(ctx, group, ranks)
