"""``pagedserve serve``: the scheduler, the worker(s) and a gateway as processes that live and die together.

The launcher only supervises. It prints where the gateway listens and when the service is ready.
SIGINT or SIGTERM drains: the gateway goes NOT_SERVING and gives running streams ``--drain-timeout``
seconds to finish, then the scheduler and the workers stop; exit 0. A child that exits on its own
stops the others and the launcher exits 1: never a half-alive service.

The scheduler and the workers talk over a unix socket and an ipc socket in a private temporary
directory; only the gateway's port is public.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from gpu_worker.engine_args import EngineArgs
from gpu_worker.model_files import resolve_model
from scheduler_svc.gateway.options import GatewayLimits, SecurityConfig, add_limit_arguments, add_security_arguments
from scheduler_svc.launcher import Child, ProcessGroup, cli_command, engine_commands

POLL_S = 0.1
HEALTH_POLL_S = 0.5


def _say(message: str) -> None:
    print(f"pagedserve: {message}", flush=True)


def _gateway_command(args: argparse.Namespace, scheduler_address: str, port_file: Path) -> list[str]:
    argv = ["--model", args.model, "--scheduler", scheduler_address, "--host", args.host, "--port", str(args.port),
            "--drain-timeout", str(args.drain_timeout), "--port-file", str(port_file), "--log-level", args.log_level]
    if args.model_name:
        argv += ["--model-name", args.model_name]
    argv += GatewayLimits.from_args(args).to_argv() + SecurityConfig.from_args(args).to_argv()
    return cli_command("gateway", *argv)


class _HealthProbe:
    """Asks the gateway's grpc.health.v1 whether it is SERVING (grpc is imported only when serving)."""

    def __init__(self, host: str, port: int) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        target_host = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host in ("::", "[::]") else host
        self._grpc, self._pb2 = grpc, health_pb2
        self._channel = grpc.insecure_channel(f"{target_host}:{port}")
        self._stub = health_pb2_grpc.HealthStub(self._channel)

    def serving(self) -> bool:
        try:
            reply = self._stub.Check(self._pb2.HealthCheckRequest(), timeout=1.0)
        except self._grpc.RpcError:
            return False
        return reply.status == self._pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self._channel.close()


class Launcher:
    def __init__(self, args: argparse.Namespace, engine: EngineArgs) -> None:
        self.args = args
        self.engine = engine
        self.tmp = Path(tempfile.mkdtemp(prefix="pagedserve-"))
        self.scheduler_address = f"unix://{self.tmp}/scheduler.sock"
        self.worker_address = f"ipc://{self.tmp}/workers.sock"
        self.group = ProcessGroup(Path(args.log_dir) if args.log_dir else None)
        self.signals = 0
        self.signalled = threading.Event()

    def _on_signal(self, *_: object) -> None:
        self.signals += 1
        self.signalled.set()

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        if self.args.log_dir:
            Path(self.args.log_dir).mkdir(parents=True, exist_ok=True)
        try:
            gateway = self._start()
            return self._supervise(gateway)
        finally:
            self.group.stop()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _start(self) -> Child:
        started = []
        commands = engine_commands(self.engine, self.scheduler_address, self.worker_address)
        commands.append(("gateway", _gateway_command(self.args, self.scheduler_address, self.tmp / "gateway.port")))
        for name, command in commands:
            child = self.group.start(name, command)
            started.append(f"{name} (pid {child.popen.pid})")
        _say(f"started {', '.join(started)}")
        _say(f"scheduler on {self.scheduler_address}, workers on {self.worker_address}")
        return self.group.children[-1]

    def _supervise(self, gateway: Child) -> int:
        port_file = self.tmp / "gateway.port"
        probe: _HealthProbe | None = None
        next_probe = 0.0
        try:
            while not self.signalled.is_set():
                dead = self.group.first_dead()
                if dead is not None:
                    return self._failed(dead)
                if probe is None and port_file.exists():
                    port = int(port_file.read_text())
                    host = self.args.host
                    _say(f"gateway listening on {f'[{host}]' if ':' in host else host}:{port}")
                    # With TLS the launcher asks the plaintext health port (written before the port file).
                    health_file = Path(f"{port_file}.health")
                    probe = _HealthProbe(host, int(health_file.read_text()) if health_file.exists() else port)
                if probe is not None and next_probe >= 0 and time.monotonic() >= next_probe:
                    if probe.serving():
                        _say(f"ready: serving {self.args.model} (device {self.args.device})")
                        next_probe = -1.0  # announce once
                    else:
                        next_probe = time.monotonic() + HEALTH_POLL_S
                self.signalled.wait(POLL_S)
        finally:
            if probe is not None:
                probe.close()
        return self._drain(gateway)

    def _failed(self, dead: Child) -> int:
        print(f"pagedserve: the {dead.name} process exited with code {dead.popen.returncode}; stopping the "
              "service", file=sys.stderr, flush=True)
        tail = self.group.log_tail(dead)
        if tail:
            print(tail, file=sys.stderr, flush=True)
        return 1

    def _drain(self, gateway: Child) -> int:
        """The gateway first (it finishes running streams), then the rest."""
        _say(f"draining: running streams get {self.args.drain_timeout:g} s to finish")
        self.signalled.clear()
        gateway.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.args.drain_timeout + 15.0
        while gateway.popen.poll() is None:
            others = [c for c in self.group.children if c is not gateway and c.popen.poll() is not None]
            if others:
                return self._failed(others[0])
            if self.signals > 1 or time.monotonic() > deadline:
                _say("stopping now")
                return 1
            self.signalled.wait(POLL_S)
            self.signalled.clear()
        if gateway.popen.returncode not in (0, -signal.SIGTERM):  # killed outright: stopped before serving
            return self._failed(gateway)
        self.group.stop()
        _say("stopped")
        return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    EngineArgs.add_args(p, "serve")
    p.add_argument("--host", default="0.0.0.0", help="gateway address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=50051, help="gateway port; 0 picks a free one (default 50051)")
    p.add_argument("--model-name", default=None, help="model name clients may send (default: the directory's name)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds running streams get to finish after SIGINT/SIGTERM (default 30)")
    p.add_argument("--log-dir", default=None, help="write each process's output to DIR/NAME.log (default: stderr)")
    p.add_argument("--log-level", default="info", help="gateway log level (default info)")
    add_limit_arguments(p.add_argument_group("gateway limits (checked before any work is done on a request)"))
    add_security_arguments(p.add_argument_group("gateway security (all off by default)"))


def check_port_free(host: str, port: int) -> None:
    """Raises OSError if the gateway could not listen on host:port (checked before any child starts).
    SO_REUSEADDR as gRPC sets it: a port left in TIME_WAIT is free to it, a listening one is not."""
    if not 0 <= port <= 65535:  # getaddrinfo would quietly take it modulo 65536
        raise OverflowError("a port is in [0, 65535]")
    if port == 0:
        return
    family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
        probe.listen(1)


def run(args: argparse.Namespace) -> int:
    try:
        resolve_model(args.model)  # a Hugging Face directory or a GGUF checkpoint
        engine = EngineArgs.from_args(args, "serve")
        GatewayLimits.from_args(args)
        security = SecurityConfig.from_args(args)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"pagedserve serve: {exc}") from None
    if security.tls and security.health_port is None:
        args.health_port = 0  # the launcher's readiness probe speaks plaintext to a health-only port
    for port in (args.port, args.health_port):
        try:
            check_port_free(args.host, port or 0)
        except (OSError, OverflowError) as exc:  # in use, not our address, not a port number
            reason = getattr(exc, "strerror", None) or exc
            raise SystemExit(f"pagedserve serve: cannot listen on {args.host}:{port}: {reason}") from None
    return Launcher(args, engine).run()
