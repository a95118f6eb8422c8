"""``pagedserve serve``: the scheduler, the worker(s) and the gateways as processes that live and die together.

The launcher only supervises. It prints where the gateways listen and when the service is ready (every
gateway SERVING). ``--gateways N`` processes share the port (see gateway_group.py). SIGINT or SIGTERM
drains: every gateway goes NOT_SERVING and gives running streams ``--drain-timeout`` seconds to finish,
then the scheduler and the workers stop; exit 0. A scheduler or worker that exits on its own stops the
others and the launcher exits 1: never a half-alive service. A gateway that dies is restarted, as the
others keep serving (gateway_group.py says when that is not survivable).

With ``--engines N`` the gateways route across N engines, and an engine that dies after it was ready is
started again instead (engine_set.py).

The schedulers and the workers talk over unix and ipc sockets in a private temporary directory; only the
gateways' ports are public (gRPC, and with --http-port the OpenAI-compatible HTTP API), and with
``--metrics-port`` the launcher's /metrics: the sum of every child's metrics (prometheus-client's
multiprocess mode, see scheduler_svc/metrics.py).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from gpu_worker import lifetime, log
from gpu_worker.engine_args import EngineArgs, check_device_present
from gpu_worker.model_files import resolve_model
from scheduler_svc.command import Command
from scheduler_svc.engine_set import EngineSet
from scheduler_svc.gateway.http_options import HttpLimits, add_http_arguments
from scheduler_svc.gateway.options import (
    GatewayLimits,
    SecurityConfig,
    add_keepalive_argument,
    add_limit_arguments,
    add_security_arguments,
)
from scheduler_svc.gateway.router import POLICIES  # standard library only
from scheduler_svc.gateway.tool_parsers import PARSERS  # standard library only
from scheduler_svc.gateway_group import GatewayFailed, GatewayGroup, check_port_free, default_num_gateways
from scheduler_svc.launcher import Child, ProcessGroup

POLL_S = 0.1
DEFAULT_METRICS_HOST = "127.0.0.1"  # as scheduler_svc.metrics's (not imported here: prometheus_client)


_logger = log.get_logger()


def _say(message: str) -> None:
    _logger.info(message)


def _gateway_argv(args: argparse.Namespace, scheduler_address: str, http_port_file: Path) -> list[str]:
    """The flags every gateway takes; the group adds host, port and its private sockets."""
    argv = ["--model", args.model, "--scheduler", scheduler_address, "--drain-timeout", str(args.drain_timeout),
            "--log-level", args.log_level, "--routing", args.routing, "--model-name", _model_name(args),
            "--scheduler-keepalive", str(args.scheduler_keepalive),
            *GatewayLimits.from_args(args).to_argv(), *SecurityConfig.from_args(args).to_argv()]
    if args.http_port is not None:  # every gateway writes the same port (one chosen before, when several)
        argv += ["--http-port", str(args.http_port), "--http-port-file", str(http_port_file),
                 *HttpLimits.from_args(args).to_argv()]
    if args.tool_call_parser:
        argv += ["--tool-call-parser", args.tool_call_parser]
    return argv


def _model_name(args: argparse.Namespace) -> str:
    """The gateway's default: the checkpoint directory's name."""
    return args.model_name or Path(args.model).resolve().name


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def http_api_url(args: argparse.Namespace, port: int) -> str:
    """Where the OpenAI-compatible API is, as the launcher announces it: https with --tls-cert."""
    scheme = "https" if args.tls_cert else "http"
    return f"{scheme}://{_url_host(args.host)}:{port}/v1"


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
        self.gateways = GatewayGroup(self.group, self.tmp, args.gateways, args.host, args.port,
                                     _gateway_argv(args, ",".join(self.engines.scheduler_addresses),
                                                   self.tmp / "gateway.http.port"), _say, self.metrics_dir)
        self.http_port_file: Path | None = self.tmp / "gateway.http.port" if args.http_port is not None else None
        self.signals: lifetime.StopSignals | None = None

    def run(self) -> int:
        self.signals = lifetime.StopSignals()
        try:
            self.gateways.check_port()
        except (OSError, OverflowError) as exc:  # in use, not our address, not a port number
            reason = getattr(exc, "strerror", None) or exc
            print(f"pagedserve serve: cannot listen on {self.args.host}:{self.args.port}: {reason}",
                  file=sys.stderr, flush=True)
            shutil.rmtree(self.tmp, ignore_errors=True)
            return 1
        log.configure("launcher", self.args.log_level)  # once nothing can fail as a one-line CLI error
        try:
            self._start()
            return self._supervise()
        finally:
            self.gateways.close()
            self.engines.close()
            self.group.stop()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _start(self) -> None:
        started = self.engines.start(self.group)
        started += [f"{c.name} (pid {c.popen.pid})" for c in self.gateways.start()]
        _say(f"started {', '.join(started)}")
        for e in self.engines.engines:
            prefix = f"{e.name}: " if len(self.engines.engines) > 1 else ""
            _say(f"{prefix}scheduler on {e.scheduler_address}, workers on {e.worker_address}")
        if self.metrics_dir is not None:
            from scheduler_svc import metrics

            try:
                port = metrics.serve_metrics(self.args.metrics_port, self.args.metrics_host, str(self.metrics_dir))
            except OSError as exc:
                raise SystemExit(f"pagedserve serve: --metrics-port {self.args.metrics_port}: {exc}") from None
            _say(f"metrics on http://{_url_host(self.args.metrics_host)}:{port}/metrics")

    def _dead_engine_process(self) -> Child | None:
        """The first scheduler or worker process that exited (gateways are the group's to handle)."""
        return next((c for c in self.group.children if not self.gateways.owns(c) and c.popen.poll() is not None),
                    None)

    def _supervise(self) -> int:
        announced_port = False
        while not self.signals.count:
            dead = self._dead_engine_process()
            if dead is not None:
                news = self.engines.lost(dead, self.group)  # None: not a replica it can start again
                if news is None:
                    return self._failed(dead)
                _say(news)
                continue
            for news in self.engines.tick(self.group):
                _say(news)
            try:
                self.gateways.poll()
            except GatewayFailed as exc:
                return self._failed(exc.child, str(exc))
            if not announced_port and self.gateways.listening:
                _say(f"gateway listening on {_url_host(self.args.host)}:{self.gateways.port}"
                     + (f" ({self.args.gateways} processes)" if self.args.gateways > 1 else ""))
                announced_port = True
            if self.http_port_file is not None and self.http_port_file.exists():
                _say(f"OpenAI-compatible HTTP API on {http_api_url(self.args, int(self.http_port_file.read_text()))}")
                self.http_port_file = None  # announced
            if announced_port and not self.gateways.announced_ready and self.gateways.ready:
                _say(f"ready: serving {self.args.model} (device {self.args.device})")
                self.gateways.announced_ready = True
            self.signals.wait(POLL_S)
        if not self.gateways.announced_ready:  # nothing runs yet: nothing to drain, stop at once
            _say("interrupted before the service was ready; stopping")
            self.group.stop(timeout_s=5.0)
            return 0
        return self._drain()

    def _failed(self, dead: Child, message: str | None = None) -> int:
        message = message or f"the {dead.name} process exited with code {dead.popen.returncode}"
        _logger.error(f"{message}; stopping the service", log_tail=self.group.log_tail(dead) or None)
        return 1

    def _drain(self) -> int:
        """The gateways first (they finish running streams), then the rest."""
        _say(f"draining: running streams get {self.args.drain_timeout:g} s to finish")

        try:
            failed = self.gateways.drain(time.monotonic() + self.args.drain_timeout + 15.0,
                                         lambda: self.signals.count > 1, self._dead_engine_process,
                                         lambda: self.signals.wait(POLL_S))
        except TimeoutError:
            _say("stopping now")
            return 1
        if failed is not None:
            return self._failed(failed)
        self.group.stop()
        _say("stopped")
        return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    EngineArgs.add_args(p, "serve")
    p.add_argument("--engines", type=int, default=1,
                   help="engines (a scheduler and its workers each) behind the gateways; with --device cuda engine "
                   "i takes GPU i, or GPUs i*T .. i*T+T-1 with --tensor-parallel-size T (default 1)")
    p.add_argument("--routing", default="prefix", choices=POLICIES,
                   help="the gateways' routing across engines: prefix (cache affinity bounded by load), "
                   "least-loaded or round-robin (default prefix)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve every process's Prometheus metrics, summed, at http://METRICS_HOST:PORT/metrics "
                   "(default: off)")
    p.add_argument("--metrics-host", default=DEFAULT_METRICS_HOST,
                   help="address of --metrics-port, plain HTTP without TLS or token (default "
                   f"{DEFAULT_METRICS_HOST}: this machine only; 0.0.0.0 to let a scraper elsewhere in)")
    p.add_argument("--host", default="0.0.0.0", help="gateway address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=50051, help="gateway port; 0 picks a free one (default 50051)")
    p.add_argument("--gateways", type=int, default=default_num_gateways(), metavar="N",
                   help="gateway processes sharing the port (SO_REUSEPORT; the kernel spreads connections over "
                   f"them); default: half the CPUs, 1 to 8 (here {default_num_gateways()})")
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                   "/v1/models) on this port of the gateway; 0 picks a free one (default: off)")
    p.add_argument("--model-name", default=None, help="model name clients may send (default: the directory's name)")
    p.add_argument("--tool-call-parser", choices=tuple(PARSERS), default=None,
                   help="tool-call format of the model's output on /v1/chat/completions: hermes, llama3_json "
                   "or mistral (default: chosen from the chat template's markers; hermes when it has none)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds running streams get to finish after SIGINT/SIGTERM (default 30)")
    p.add_argument("--log-dir", default=None, help="write each process's output to DIR/NAME.log (default: stderr)")
    p.add_argument("--log-level", default="info", help="log level of the launcher and the gateways (default info)")
    add_keepalive_argument(p)
    add_limit_arguments(p.add_argument_group("gateway limits (checked before any work is done on a request)"))
    add_security_arguments(p.add_argument_group("gateway security (all off by default)"))
    add_http_arguments(p.add_argument_group("the HTTP port's timeouts and caps (with --http-port)"))


def run(args: argparse.Namespace) -> int:
    try:
        resolve_model(args.model)  # a Hugging Face directory or a GGUF checkpoint
        engine = EngineArgs.from_args(args, "serve")
        GatewayLimits.from_args(args)
        SecurityConfig.from_args(args)
        HttpLimits.from_args(args)
        check_device_present(engine.device, engine.tensor_parallel_size * max(1, args.engines))
        if args.log_dir:
            Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"pagedserve serve: {exc}") from None
    if args.gateways < 1:
        raise SystemExit(f"pagedserve serve: --gateways must be at least 1, got {args.gateways}")
    if args.http_port is not None:  # several gateways share one HTTP port: choose it now (port 0), checked free
        try:
            args.http_port = check_port_free(args.host, args.http_port) if args.gateways > 1 or args.http_port \
                else 0
        except (OSError, OverflowError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise SystemExit(f"pagedserve serve: cannot listen on {args.host}:{args.http_port}: {reason}") from None
    if args.health_port:  # the gateways' plaintext health-only port (their main one is checked by the group)
        try:
            check_port_free(args.host, args.health_port)
        except (OSError, OverflowError) as exc:  # in use, not our address, not a port number
            reason = getattr(exc, "strerror", None) or exc
            raise SystemExit(f"pagedserve serve: cannot listen on {args.host}:{args.health_port}: {reason}") from None
    try:
        launcher = Launcher(args, engine)
    except ValueError as exc:
        raise SystemExit(f"pagedserve serve: {exc}") from None
    return launcher.run()


COMMAND = Command("serve", "serve a model over gRPC (gateway, scheduler and worker processes)",
                  "Start a gateway, a scheduler and the workers as separate processes and supervise them. "
                  "SIGINT/SIGTERM drains running streams, then exits 0; if any process dies, the others are "
                  "stopped and the exit status is 1.", add_arguments, run)
