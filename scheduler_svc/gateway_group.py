"""N gateway processes behind one port, as ``pagedserve serve --gateways N`` and ``bench gateway`` run them.

A gateway is one asyncio event loop, so one core at most; being stateless, it scales by processes. The N
processes listen on the same port with SO_REUSEPORT and the kernel spreads incoming connections over
them (per connection, not per stream: one client channel lands on one gateway). Each keeps its own
Connect stream to the scheduler. With N == 1 the gateway binds without SO_REUSEPORT, so that a second
one on a used port fails instead of sharing it; with N > 1 the port is checked free before any child
starts (an SO_REUSEPORT group must not be joined to a stranger's socket), and port 0 becomes one free
port picked here and given to all.

Each gateway also listens on a private unix socket in the launcher's temporary directory, where the
group asks its health: the service is ready when every gateway is SERVING (a probe on the shared port
would reach only one of them).

A gateway that dies after it has been listening is restarted on the same port (survived by design):
its streams end UNAVAILABLE on the client (the connection drops) and aborted in the scheduler (its
Connect stream ends), its live gauges leave the service's /metrics (it is marked dead in the
multiprocess directory; its counters keep counting in the totals), while the other gateways keep
serving and take the clients' new connections (the kernel drops a closed socket from the group). A
gateway that exits before it ever listened (bad arguments, a port taken), or more than
``MAX_RESTARTS`` restarts within ``RESTART_WINDOW_S``, is a failure of the service: the launcher
stops everything and exits 1, never running half alive.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from scheduler_svc.launcher import Child, ProcessGroup, cli_command

MAX_RESTARTS = 3
RESTART_WINDOW_S = 60.0
PROBE_INTERVAL_S = 0.25


def default_num_gateways(num_cpus: int | None = None) -> int:
    """Half the CPUs the process may use, 1 to 8: a gateway uses up to one core, and the other half is
    left to the scheduler, the workers' host threads and local clients; past about 8 the engine, not
    the gateways, limits a host (one gateway carried ~20k tokens/s on the H200 before this work)."""
    if num_cpus is None:
        num_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, max(1, num_cpus // 2))


def _bind_address(host: str, port: int) -> tuple[int, tuple]:
    family, _, _, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                  flags=socket.AI_PASSIVE)[0]
    return family, address


def check_port_free(host: str, port: int) -> int:
    """Binds ``host:port`` without SO_REUSEPORT and lets go; raises OSError when something holds it.
    Returns the port (a free one picked by the kernel for port 0). OverflowError outside [0, 65535]."""
    if not 0 <= port <= 65535:  # getaddrinfo would quietly take it modulo 65536
        raise OverflowError("a port is in [0, 65535]")
    family, address = _bind_address(host, port)
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc binds: TIME_WAIT does not count
        s.bind(address)
        return s.getsockname()[1]


class _Probe:
    """grpc.health.v1 Check on one address (grpc is imported only when serving)."""

    def __init__(self, target: str) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self._grpc, self._pb2 = grpc, health_pb2
        self._channel = grpc.insecure_channel(target)
        self._stub = health_pb2_grpc.HealthStub(self._channel)

    def serving(self) -> bool:
        try:
            reply = self._stub.Check(self._pb2.HealthCheckRequest(), timeout=1.0)
        except self._grpc.RpcError:
            return False
        return reply.status == self._pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self._channel.close()


class GatewayFailed(RuntimeError):
    """The gateways cannot be kept running; ``child`` is the one that exited."""

    def __init__(self, child: Child, message: str) -> None:
        super().__init__(message)
        self.child = child


class GatewayGroup:
    def __init__(self, group: ProcessGroup, tmp: Path, num_gateways: int, host: str, port: int,
                 argv: list[str], say: Callable[[str], None] = lambda _: None, metrics_dir: Path | None = None) -> None:
        """``argv``: the gateway flags common to all (model, scheduler, drain timeout, log level...);
        ``metrics_dir``: the children's prometheus multiprocess directory, if any."""
        if num_gateways < 1:
            raise ValueError(f"--gateways must be at least 1, got {num_gateways}")
        self.group, self.tmp, self.num, self.host, self.port = group, tmp, num_gateways, host, port
        self.argv, self.say = argv, say
        self.children: list[Child] = []
        self._listening: list[bool] = []
        self._probes: list[_Probe | None] = []
        self._serving: list[bool] = []
        self._next_probe = 0.0
        self._restarts: deque[float] = deque()
        self.announced_ready = False
        self.metrics_dir = metrics_dir

    def name(self, i: int) -> str:
        return "gateway" if self.num == 1 else f"gateway{i}"

    def _port_file(self, i: int) -> Path:
        return self.tmp / f"{self.name(i)}.port"

    def socket_path(self, i: int) -> Path:
        return self.tmp / f"{self.name(i)}.sock"

    def check_port(self) -> None:
        """Before any child starts: the port is free; port 0 with N > 1 becomes a picked free port."""
        if self.port or self.num > 1:
            self.port = check_port_free(self.host, self.port)

    def _command(self, i: int) -> list[str]:
        argv = [*self.argv, "--host", self.host, "--port", str(self.port), "--port-file", str(self._port_file(i)),
                "--local-socket", str(self.socket_path(i))]
        return cli_command("gateway", *argv, *(["--reuse-port"] if self.num > 1 else []))

    def start(self) -> list[Child]:
        for i in range(self.num):
            self.children.append(self.group.start(self.name(i), self._command(i)))
            self._listening.append(False)
            self._probes.append(None)
            self._serving.append(False)
        return self.children

    def owns(self, child: Child) -> bool:
        return any(child is c for c in self.children)

    def poll(self) -> None:
        """Notices gateways that started listening, probes health until all are SERVING, restarts dead
        ones; raises GatewayFailed when a death is not survivable."""
        for i, child in enumerate(self.children):
            if child.popen.poll() is not None:
                self._restart(i)
            elif not self._listening[i] and self._port_file(i).exists():
                self._listening[i] = True
                self.port = self.port or int(self._port_file(i).read_text())  # N == 1 with port 0
                self._probes[i] = _Probe(f"unix:{self.socket_path(i)}")
        if all(self._serving) or not all(self._listening) or time.monotonic() < self._next_probe:
            return
        self._next_probe = time.monotonic() + PROBE_INTERVAL_S
        for i, probe in enumerate(self._probes):
            if not self._serving[i] and probe is not None:
                self._serving[i] = probe.serving()

    @property
    def listening(self) -> bool:
        return all(self._listening)

    @property
    def ready(self) -> bool:
        return all(self._serving)

    def _restart(self, i: int) -> None:
        child = self.children[i]
        code = child.popen.returncode
        if not self._listening[i]:
            raise GatewayFailed(child, f"the {child.name} process exited with code {code} before it listened")
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > RESTART_WINDOW_S:
            self._restarts.popleft()
        if len(self._restarts) >= MAX_RESTARTS:
            raise GatewayFailed(child, f"the {child.name} process exited with code {code}; gateways exited "
                                f"{MAX_RESTARTS + 1} times within {RESTART_WINDOW_S:g} s")
        self._restarts.append(now)
        self._port_file(i).unlink(missing_ok=True)
        if self.metrics_dir is not None:  # its live gauges (requests in flight...) die with it
            from scheduler_svc import metrics

            metrics.mark_dead(child.popen.pid, str(self.metrics_dir))
        if self._probes[i] is not None:
            self._probes[i].close()
        self._listening[i], self._probes[i], self._serving[i] = False, None, False
        # With the port it has now: a gateway started on port 0 alone picked it, and clients know that one.
        self.children[i] = self.group.restart(child, self._command(i))
        self.say(f"the {child.name} process exited with code {code}; restarted it (pid "
                 f"{self.children[i].popen.pid}); the other gateways kept serving")

    def drain(self, deadline: float, interrupted: Callable[[], bool],
              others_dead: Callable[[], Child | None], wait: Callable[[], None]) -> Child | None:
        """SIGTERM to every gateway, then waits for all to exit. Returns the child that makes this a
        failure (a gateway killed outright, or another process that died meanwhile), else None; raises
        TimeoutError past ``deadline`` or when ``interrupted``."""
        for c in self.children:
            if c.popen.poll() is None:
                c.popen.send_signal(signal.SIGTERM)
        while any(c.popen.poll() is None for c in self.children):
            dead = others_dead()
            if dead is not None:
                return dead
            if interrupted() or time.monotonic() > deadline:
                raise TimeoutError("the gateways did not finish draining")
            wait()
        # killed outright (not by our SIGTERM's drain): it stopped before serving its streams to the end
        return next((c for c in self.children if c.popen.returncode not in (0, -signal.SIGTERM)), None)

    def close(self) -> None:
        for probe in self._probes:
            if probe is not None:
                probe.close()
