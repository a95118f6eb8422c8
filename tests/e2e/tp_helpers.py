"""What the killed-process tests (one worker, and a rank of a tensor-parallel engine, on CPU and GPU)
share: a `pagedserve serve --tensor-parallel-size 2` launcher, and long streams that must all end
UNAVAILABLE within 5 s of a process's death."""

import os
import signal
import threading
import time
from pathlib import Path

import grpc

import clients  # noqa: F401

# isort: split
from pagedserve.client import Client, GenerationError, SamplingParams
from scheduler_svc.bench.local_service import LocalService


def serve_two_ranks(model: Path, log_dir: Path, *extra: str) -> LocalService:
    """`pagedserve serve --tensor-parallel-size 2` ready to serve."""
    svc = LocalService(model, "--kv-cache-memory", "32MiB", "--tensor-parallel-size", "2", *extra, log_dir=log_dir,
                       start_timeout_s=300)
    assert {"worker0", "worker1"} <= set(svc.pids), "\n".join(svc.lines)
    return svc


def kill_mid_stream(svc: LocalService, name: str, max_tokens: int | None) -> None:
    """Starts 4 streams, SIGKILLs child ``name`` once each has a token, and checks that every stream ends
    UNAVAILABLE within 5 s and the launcher exits non-zero within 60 s."""
    results: dict = {}
    started = [threading.Event() for _ in range(4)]

    def stream(i: int) -> None:
        try:
            with Client(svc.target) as client:
                for _ in client.generate("Hello", SamplingParams(max_tokens=max_tokens, ignore_eos=True), timeout=120):
                    started[i].set()
            results[i] = "finished"
        except GenerationError as exc:
            results[i] = exc
        results[f"{i}-end"] = time.monotonic()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    assert all(e.wait(120) for e in started)
    killed = time.monotonic()
    os.kill(svc.pids[name], signal.SIGKILL)
    for t in threads:
        t.join(30)
    for i in range(4):
        assert isinstance(results[i], GenerationError), results[i]
        assert results[i].code == grpc.StatusCode.UNAVAILABLE
        assert results[f"{i}-end"] - killed < 5.0
    assert svc.proc.wait(60) != 0
