"""What the tensor-parallel kill tests (CPU and GPU) share: a `pagedserve serve --tensor-parallel-size 2`
launcher, and long streams that must all end UNAVAILABLE within 5 s of a rank's death."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc

import clients  # noqa: F401

# isort: split
from pagedserve.client import Client, GenerationError, SamplingParams

REPO = Path(__file__).resolve().parents[2]


def serve_two_ranks(model: Path, log_dir: Path, *extra: str) -> tuple[subprocess.Popen, str, dict[str, int]]:
    """`pagedserve serve --tensor-parallel-size 2` ready to serve: (launcher, gateway target, pid by name)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "scheduler_svc.cli", "serve", "--model", str(model), "--host", "127.0.0.1", "--port",
         "0", "--log-dir", str(log_dir), "--kv-cache-memory", "32MiB", "--tensor-parallel-size", "2", *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    out = ""
    while not (m := re.search(r"gateway listening on 127\.0\.0\.1:(\d+)", out)):
        line = proc.stdout.readline()
        assert line, f"the launcher exited:\n{out}"
        out += line
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
    pids = {name: int(pid) for name, pid in re.findall(r"(\w+) \(pid (\d+)\)", out)}
    assert {"worker0", "worker1"} <= set(pids), out
    target = f"127.0.0.1:{m.group(1)}"
    with Client(target) as client:
        client.wait_ready(300)
    return proc, target, pids


def kill_a_rank_mid_stream(proc: subprocess.Popen, target: str, pid: int, max_tokens: int) -> None:
    """Starts 4 streams, SIGKILLs ``pid`` once each has a token, and checks that every stream ends
    UNAVAILABLE within 5 s and the launcher exits non-zero within 60 s."""
    results: dict = {}
    started = [threading.Event() for _ in range(4)]

    def stream(i: int) -> None:
        try:
            with Client(target) as client:
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
    os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join(30)
    for i in range(4):
        assert isinstance(results[i], GenerationError), results[i]
        assert results[i].code == grpc.StatusCode.UNAVAILABLE
        assert results[f"{i}-end"] - killed < 5.0
    assert proc.wait(60) != 0


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
