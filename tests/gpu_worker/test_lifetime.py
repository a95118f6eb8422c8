"""What every process of the service does with signals: the launcher's SIGINT/SIGTERM handler takes no
lock (a handler that called threading.Event.set() could deadlock the launcher on SIGTERM, and a CI run
saw it hang until killed); SIGUSR1 prints every thread's stack and the process goes on; and a test's
LocalService that must kill a stuck launcher first collects those stacks."""

import signal
import subprocess
import sys
import threading
import time

import pytest

from gpu_worker.lifetime import StopSignals
from scheduler_svc.bench.local_service import REPO, LocalService
from tests.waiting import wait_until

# Waits for a first signal with a 30 s timeout, then for a second: each line says how soon it woke.
WAITER = """
import sys, time
from gpu_worker.lifetime import StopSignals
s = StopSignals()
print("ready", flush=True)
for n in (1, 2):
    t = time.monotonic()
    while s.count < n:
        s.wait(30)
    print(f"count {s.count} after {time.monotonic() - t:.2f}", flush=True)
"""

# Ignores SIGTERM (a stuck launcher) after dumping stacks on SIGUSR1 as the service's processes do.
STUCK = """
import signal, threading, time
from gpu_worker import lifetime
lifetime.dump_stacks_on_sigusr1()
signal.signal(signal.SIGTERM, signal.SIG_IGN)
def stuck_here():
    threading.Event().wait()
print("ready", flush=True)
stuck_here()
"""


def start(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_a_signal_wakes_the_wait_at_once_and_each_is_counted():
    proc = start(WAITER)
    try:
        assert proc.stdout.readline().strip() == "ready"
        for n in (1, 2):
            proc.send_signal(signal.SIGTERM if n == 1 else signal.SIGINT)
            count, after = proc.stdout.readline().split()[1::2]
            assert int(count) == n and float(after) < 5.0  # not the 30 s timeout
        assert proc.wait(30) == 0
    finally:
        proc.kill()


def test_the_handler_takes_no_lock():
    """Python runs a handler in the main thread between two bytecodes, wherever that thread is: one that
    acquires a lock the interrupted code holds (Event.set() inside Event.wait()) never returns."""
    signals = StopSignals((signal.SIGUSR2,))
    previous = signal.getsignal(signal.SIGUSR2)
    locks = (type(threading.Lock()), type(threading.RLock()))
    called = []

    def profile(frame, event, arg):
        if event == "c_call":
            called.append(getattr(arg, "__self__", None))

    try:
        sys.setprofile(profile)
        signals._on_signal(signal.SIGUSR2, None)
        sys.setprofile(None)
        assert called and not [c for c in called if isinstance(c, locks)]
        # An Event-based handler would be caught by the same check.
        called.clear()
        event = threading.Event()
        sys.setprofile(profile)
        event.set()
        sys.setprofile(None)
        assert [c for c in called if isinstance(c, locks)]
        assert signals.count == 1 and signals.wait(0) == 1
    finally:
        sys.setprofile(None)
        signal.signal(signal.SIGUSR2, previous)
        signals.close()


@pytest.mark.slow
def test_sigusr1_prints_every_threads_stack_and_the_process_goes_on(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "scheduler_svc.cli", "scheduler", "--listen",
                             f"unix:{tmp_path}/s.sock", "--workers", f"ipc://{tmp_path}/w.sock"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        wait_until(lambda: any("listening" in line for line in lines), 60, what="the scheduler to listen")
        proc.send_signal(signal.SIGUSR1)
        wait_until(lambda: any("most recent call first" in line for line in lines), 10, what="a stack dump")
        time.sleep(0.5)
        assert proc.poll() is None  # still running, still waiting for its workers
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert any('File "' in line and "scheduler_svc" in line for line in lines), "".join(lines)
    finally:
        proc.kill()


@pytest.mark.slow
def test_a_launcher_that_ignores_sigterm_is_killed_after_its_stacks_are_collected():
    svc = object.__new__(LocalService)  # the stop() of a started service, without starting one
    svc.lines, svc.proc = [], start(STUCK)
    svc._reader = threading.Thread(target=svc._read, daemon=True)
    svc._reader.start()
    wait_until(lambda: "ready" in svc.lines, 30, what="the stuck process to start")
    assert svc.stop(timeout_s=1.0) == -signal.SIGKILL
    text = "\n".join(svc.lines)
    assert "did not exit 1 s after SIGTERM" in text and "in stuck_here" in text, text
