"""The gateway group's port rules and restart budget, without a model: a held port is refused before any
child starts, port 0 with several gateways becomes one picked port, a gateway that dies after it listened
is restarted (within a budget), one that dies before is a failure."""

import socket
import subprocess
import sys
import time

import pytest

from scheduler_svc import gateway_group
from scheduler_svc.gateway_group import GatewayFailed, GatewayGroup, check_port_free, default_num_gateways
from scheduler_svc.launcher import ProcessGroup
from tests.factories import make_checkpoint


def test_default_gateways_is_half_the_cpus_within_1_to_8():
    assert [default_num_gateways(n) for n in (1, 2, 3, 4, 16, 64)] == [1, 1, 1, 2, 8, 8]
    assert 1 <= default_num_gateways() <= 8


def test_a_held_port_is_refused_and_port_zero_picks_a_free_one():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(OSError):
            check_port_free("127.0.0.1", port)
    picked = check_port_free("127.0.0.1", 0)
    assert picked > 0 and check_port_free("127.0.0.1", picked) == picked


@pytest.mark.slow
def test_serve_refuses_a_held_port_before_starting_anything(tmp_path):
    model = make_checkpoint(tmp_path / "m")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        for n in ("1", "2"):
            start = time.monotonic()
            proc = subprocess.run(
                [sys.executable, "-m", "scheduler_svc.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
                 "--port", str(port), "--gateways", n, "--device", "cpu"],
                capture_output=True, text=True, timeout=120,
            )
            assert proc.returncode == 1 and "started" not in proc.stdout, proc.stdout
            assert proc.stderr.strip().startswith(f"pagedserve serve: cannot listen on 127.0.0.1:{port}: ")
            assert len(proc.stderr.strip().splitlines()) == 1
            assert time.monotonic() - start < 60


class _Sleeper(GatewayGroup):
    """A group whose 'gateways' are sleeping processes that write their port file like a gateway."""

    def _command(self, i: int) -> list[str]:
        code = (f"import pathlib, time; pathlib.Path({str(self._port_file(i))!r}).write_text('{self.port}'); "
                "time.sleep(60)")
        return [sys.executable, "-c", code]


def _wait_listening(group: GatewayGroup) -> None:
    deadline = time.monotonic() + 30
    while not group.listening:
        group.poll()
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_dead_gateways_are_restarted_within_a_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(gateway_group, "_Probe", lambda target: None)  # no gRPC behind these
    said = []
    processes = ProcessGroup()
    group = _Sleeper(processes, tmp_path, 2, "127.0.0.1", 0, [], said.append)
    try:
        group.check_port()
        assert group.port > 0  # picked here, the same for both
        group.start()
        _wait_listening(group)
        for _ in range(gateway_group.MAX_RESTARTS):
            victim = group.children[1]
            victim.popen.kill()
            victim.popen.wait()
            group.poll()
            assert group.children[1] is not victim and group.children[1].popen.poll() is None
            assert said[-1].startswith("the gateway1 process exited with code -9; restarted it")
            assert processes.children.count(group.children[1]) == 1 and len(processes.children) == 2
            _wait_listening(group)
        group.children[0].popen.kill()
        group.children[0].popen.wait()
        with pytest.raises(GatewayFailed, match="gateways exited 4 times within 60 s"):
            group.poll()
    finally:
        processes.stop()


class _InFlight(_Sleeper):
    """Sleeping 'gateways' that each hold 2 requests in flight in the multiprocess metrics, as a
    gateway's pagedserve_gateway_requests_in_flight does (until restarted: 0)."""

    def _command(self, i: int) -> list[str]:
        held = 0 if self.children[i:] else 2  # a restarted one starts idle
        code = ("from scheduler_svc.gateway.metrics import IN_FLIGHT; "
                f"IN_FLIGHT.labels('m').set({held}); " + super()._command(i)[-1])
        return [sys.executable, "-c", code]


def test_a_dead_gateways_live_gauges_leave_the_metrics(tmp_path, monkeypatch):
    """Issue 22: after a killed gateway, the service's in-flight gauge kept the dead process's value
    forever (its multiprocess file stayed). A restart marks the dead one's pid dead."""
    from scheduler_svc import metrics

    def in_flight() -> float:
        reg = metrics.registry(str(tmp_path / "metrics"))
        return sum(s.value for f in reg.collect() for s in f.samples
                   if s.name == "pagedserve_gateway_requests_in_flight")

    monkeypatch.setattr(gateway_group, "_Probe", lambda target: None)
    (tmp_path / "metrics").mkdir()
    processes = ProcessGroup(env={metrics.MULTIPROC_ENV: str(tmp_path / "metrics")})
    group = _InFlight(processes, tmp_path, 2, "127.0.0.1", 0, [], metrics_dir=tmp_path / "metrics")
    try:
        group.check_port()
        group.start()
        _wait_listening(group)
        assert in_flight() == 4
        victim = group.children[1]
        victim.popen.kill()
        victim.popen.wait()
        group.poll()
        _wait_listening(group)
        assert in_flight() == 2  # the survivor's; the dead one's 2 are gone
        assert not list((tmp_path / "metrics").glob(f"gauge_livesum_{victim.popen.pid}.db"))
    finally:
        processes.stop()


def test_a_gateway_that_never_listened_is_a_failure(tmp_path):
    processes = ProcessGroup()
    group = GatewayGroup(processes, tmp_path, 1, "127.0.0.1", 0, ["--no-such-flag"])
    try:
        group.start()
        group.children[0].popen.wait(60)
        with pytest.raises(GatewayFailed, match="exited with code 2 before it listened"):
            group.poll()
    finally:
        processes.stop()
