"""``pagedserve serve``: the scheduler, the worker(s) and a gateway as processes that live and die together.

The launcher only supervises. It prints where the gateway listens and when the service is ready.
SIGINT or SIGTERM drains: the gateway goes NOT_SERVING and gives running streams ``--drain-timeout``
seconds to finish, then the scheduler and the workers stop; exit 0. A child that exits on its own
stops the others and the launcher exits 1: never a half-alive service.

The scheduler and the workers talk over a unix socket and an ipc socket in a private temporary
directory; only the gateway's ports are public (gRPC, and with --http-port the OpenAI-compatible HTTP API).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from gpu_worker.engine_args import EngineArgs
from gpu_worker.model_files import resolve_model
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
    if args.http_port is not None:
        argv += ["--http-port", str(args.http_port), "--http-port-file", str(_http_port_file(port_file))]
    return cli_command("gateway", *argv)


def _http_port_file(port_file: Path) -> Path:
    return port_file.with_name("gateway.http.port")


def _host_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


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
        http_port_file = _http_port_file(port_file) if self.args.http_port is not None else None
        probe: _HealthProbe | None = None
        next_probe = 0.0
        try:
            while not self.signalled.is_set():
                dead = self.group.first_dead()
                if dead is not None:
                    return self._failed(dead)
                if http_port_file is not None and http_port_file.exists():  # written before the gRPC port file
                    _say(f"OpenAI-compatible HTTP API on http://{_host_url(self.args.host)}:"
                         f"{int(http_port_file.read_text())}/v1")
                    http_port_file = None
                if probe is None and port_file.exists():
                    port = int(port_file.read_text())
                    host = self.args.host
                    _say(f"gateway listening on {_host_url(host)}:{port}")
                    probe = _HealthProbe(host, port)
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
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                   "/v1/models) on this port of the gateway; 0 picks a free one (default: off)")
    p.add_argument("--model-name", default=None, help="model name clients may send (default: the directory's name)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds running streams get to finish after SIGINT/SIGTERM (default 30)")
    p.add_argument("--log-dir", default=None, help="write each process's output to DIR/NAME.log (default: stderr)")
    p.add_argument("--log-level", default="info", help="gateway log level (default info)")


def run(args: argparse.Namespace) -> int:
    try:
        resolve_model(args.model)  # a Hugging Face directory or a GGUF checkpoint
    except (OSError, ValueError) as exc:
        raise SystemExit(f"pagedserve serve: {exc}") from None
    try:
        engine = EngineArgs.from_args(args, "serve")
    except ValueError as exc:
        raise SystemExit(f"pagedserve serve: {exc}") from None
    return Launcher(args, engine).run()
