"""``pagedserve serve``: the scheduler, the worker(s) and a gateway as processes that live and die together.

The launcher only supervises. It prints where the gateway listens and when the service is ready.
SIGINT or SIGTERM drains: the gateway goes NOT_SERVING and gives running streams ``--drain-timeout``
seconds to finish, then the scheduler and the workers stop; exit 0. A child that exits on its own
stops the others and the launcher exits 1: never a half-alive service. With ``--engines N`` the gateway
routes across N engines, and an engine that dies after it was ready is started again instead
(engine_set.py).

The schedulers and the workers talk over unix and ipc sockets in a private temporary directory; only
the gateway's port is public, and with ``--metrics-port`` the launcher's /metrics: the sum of every
child's metrics (prometheus-client's multiprocess mode, see scheduler_svc/metrics.py).
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
from scheduler_svc.engine_set import EngineSet
from scheduler_svc.gateway.router import POLICIES  # standard library only
from scheduler_svc.launcher import Child, ProcessGroup, cli_command

POLL_S = 0.1
HEALTH_POLL_S = 0.5


def _say(message: str) -> None:
    print(f"pagedserve: {message}", flush=True)


def _gateway_command(args: argparse.Namespace, scheduler_address: str, port_file: Path) -> list[str]:
    argv = ["--model", args.model, "--scheduler", scheduler_address, "--host", args.host, "--port", str(args.port),
            "--drain-timeout", str(args.drain_timeout), "--port-file", str(port_file), "--log-level", args.log_level,
            "--routing", args.routing, "--model-name", _model_name(args)]
    return cli_command("gateway", *argv)


def _model_name(args: argparse.Namespace) -> str:
    """The gateway's default: the checkpoint directory's name."""
    return args.model_name or Path(args.model).resolve().name


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
        self.metrics_dir = self.tmp / "metrics" if args.metrics_port is not None else None
        env = {}
        if self.metrics_dir is not None:
            from scheduler_svc import metrics

            self.metrics_dir.mkdir()
            env[metrics.MULTIPROC_ENV] = str(self.metrics_dir)
        self.engines = EngineSet(engine, args.engines, self.tmp, _model_name(args), self.metrics_dir)
        self.group = ProcessGroup(Path(args.log_dir) if args.log_dir else None, env)
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
        started = self.engines.start(self.group)
        addresses = ",".join(self.engines.scheduler_addresses)
        gateway = self.group.start("gateway", _gateway_command(self.args, addresses, self.tmp / "gateway.port"))
        started.append(f"gateway (pid {gateway.popen.pid})")
        _say(f"started {', '.join(started)}")
        for e in self.engines.engines:
            prefix = f"{e.name}: " if len(self.engines.engines) > 1 else ""
            _say(f"{prefix}scheduler on {e.scheduler_address}, workers on {e.worker_address}")
        if self.metrics_dir is not None:
            from scheduler_svc import metrics

            try:
                port = metrics.serve_metrics(self.args.metrics_port, self.args.host, str(self.metrics_dir))
            except OSError as exc:
                raise SystemExit(f"pagedserve serve: --metrics-port {self.args.metrics_port}: {exc}") from None
            _say(f"metrics on http://{_url_host(self.args.host)}:{port}/metrics")
        return gateway

    def _supervise(self, gateway: Child) -> int:
        port_file = self.tmp / "gateway.port"
        probe: _HealthProbe | None = None
        next_probe = 0.0
        try:
            while not self.signalled.is_set():
                dead = self.group.first_dead()
                if dead is not None:
                    news = self.engines.lost(dead, self.group)
                    if news is None:
                        return self._failed(dead)
                    _say(news)
                    continue
                for news in self.engines.tick(self.group):
                    _say(news)
                if probe is None and port_file.exists():
                    port = int(port_file.read_text())
                    _say(f"gateway listening on {_url_host(self.args.host)}:{port}")
                    probe = _HealthProbe(self.args.host, port)
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
            self.engines.close()
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


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def add_arguments(p: argparse.ArgumentParser) -> None:
    EngineArgs.add_args(p, "serve")
    p.add_argument("--engines", type=int, default=1,
                   help="engines (a scheduler and its workers each) behind the gateway; with --device cuda engine i "
                   "takes GPU i, or GPUs i*T .. i*T+T-1 with --tensor-parallel-size T (default 1)")
    p.add_argument("--routing", default="prefix", choices=POLICIES,
                   help="the gateway's routing across engines: prefix (cache affinity bounded by load), least-loaded "
                   "or round-robin (default prefix)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve every process's Prometheus metrics, summed, at http://HOST:PORT/metrics (default: off)")
    p.add_argument("--host", default="0.0.0.0", help="gateway address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=50051, help="gateway port; 0 picks a free one (default 50051)")
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
        launcher = Launcher(args, engine)
    except ValueError as exc:
        raise SystemExit(f"pagedserve serve: {exc}") from None
    return launcher.run()
