"""ProcessGroup stops its children in stages (gateway, scheduler, workers), so that a scheduler never
sees its workers leave before it was told to stop; and when several children have died, the one a
signal killed is named first."""

import signal
import sys

import pytest

from scheduler_svc.launcher import ProcessGroup, stop_stage
from tests.waiting import wait_until

pytestmark = pytest.mark.slow  # starts processes

# Notes its name and the time in the shared file when SIGTERM arrives, lingers a little, then exits.
CHILD = """
import signal, sys, time
def term(*_):
    with open(sys.argv[2], "a") as f:
        f.write(f"{sys.argv[1]} {time.monotonic()}\\n")
    time.sleep(0.2)
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
open(sys.argv[2] + "." + sys.argv[1], "w").close()
while True:
    time.sleep(0.05)
"""


def test_stop_goes_stage_by_stage(tmp_path):
    log = tmp_path / "terms"
    group = ProcessGroup()
    for name in ("scheduler", "worker0", "worker1", "gateway"):  # the launchers' start order
        group.start(name, [sys.executable, "-c", CHILD, name, str(log)])
    wait_until(lambda: all((tmp_path / f"terms.{n}").exists() for n in ("scheduler", "worker0", "worker1",
                                                                           "gateway")), 30, what="children up")
    group.stop()
    terms = [line.split() for line in log.read_text().splitlines()]
    order = [name for name, _ in terms]
    assert order[:2] == ["gateway", "scheduler"] and sorted(order[2:]) == ["worker0", "worker1"]
    times = {name: float(t) for name, t in terms}
    # Each stage was waited for: the scheduler heard SIGTERM only after the gateway had exited (0.2 s).
    assert times["scheduler"] - times["gateway"] >= 0.15 and min(times["worker0"], times["worker1"]) - times[
        "scheduler"] >= 0.15
    assert all(c.popen.returncode == 0 for c in group.children)
    assert [stop_stage(n) for n in ("gateway", "scheduler", "worker", "worker3")] == [0, 1, 2, 2]


def test_the_child_killed_by_a_signal_is_named_first():
    group = ProcessGroup()
    scheduler = group.start("scheduler", [sys.executable, "-c", "import sys; sys.exit(1)"])
    worker = group.start("worker", [sys.executable, "-c", "import time; time.sleep(60)"])
    scheduler.popen.wait(30)
    assert group.first_dead() is scheduler
    worker.popen.send_signal(signal.SIGKILL)
    worker.popen.wait(30)
    assert group.first_dead() is worker  # the scheduler most likely exited because of it
    group.stop()
