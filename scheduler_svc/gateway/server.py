"""The gateway process: pagedserve.v1.GenerationService in front of one scheduler (grpc.aio).

Stateless between requests. A request's life (validate, tokenize, submit over the one Connect stream
kept to the scheduler, text deltas out) is GenerationCore's (generation.py); this module is its gRPC
face, plus grpc.health.v1, server reflection, the scheduler watcher and draining. Health is SERVING only while the
scheduler reports ready, the stream is open and the gateway is not draining. Requests larger than
``--max-request-bytes`` are refused by gRPC before any of them is read into a message; TLS, mTLS and
token authentication are optional (security.py).

    pagedserve gateway --model DIR --scheduler HOST:PORT --port 50051
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

import clients  # noqa: F401
from gpu_worker import lifetime
from pagedserve.v1 import generation_pb2, generation_pb2_grpc
from scheduler_svc import log
from scheduler_svc.gateway import protocol, security
from scheduler_svc.gateway.generation import SHUTDOWN, GenerationCore, GenerationFailed
from scheduler_svc.gateway.options import (
    DEFAULT_LIMITS,
    GatewayLimits,
    SecurityConfig,
    add_limit_arguments,
    add_security_arguments,
)
from scheduler_svc.gateway.scheduler_link import SchedulerLink
from scheduler_svc.gateway.tokenizer import Tokenizer

SERVICE = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"]
SERVICE_NAME = SERVICE.full_name
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "[::1]", "localhost")


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    """The gRPC face of GenerationCore: requests in, response batches written to the stream, a
    GenerationFailed as the call's status (INVALID_ARGUMENT with a google.rpc.BadRequest detail)."""

    def __init__(self, core: GenerationCore) -> None:
        self.core = core

    async def Generate(self, request, context):
        def cancel_status() -> str:
            remaining = context.time_remaining()
            return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"

        try:
            async for batch in self.core.generate(request, cancel_status):
                for resp in batch:
                    await context.write(resp)
        except GenerationFailed as exc:
            await _abort(context, exc)

    async def Tokenize(self, request, context):
        try:
            ids = await self.core.tokenize(request.text, request.model)
        except GenerationFailed as exc:
            await _abort(context, exc)
        tokens = [self.core.tokenizer.id_to_token(i) or "" for i in ids]
        return generation_pb2.TokenizeResponse(token_ids=ids, tokens=tokens)

    async def GetModelInfo(self, request, context):
        info = self.core.info
        if info is None:
            await _abort(context, GenerationFailed(grpc.StatusCode.UNAVAILABLE, "the scheduler is not ready"))
        return generation_pb2.GetModelInfoResponse(
            model=self.core.model_name, architecture=info.architecture, max_model_len=info.max_model_len,
            vocab_size=info.vocab_size, block_size=info.block_size, num_kv_blocks=info.num_blocks,
            dtype=info.dtype, eos_token_ids=info.eos_token_ids,
        )


async def _abort(context, failure: GenerationFailed) -> None:
    """Ends the call with the failure's status; a bad field travels as a google.rpc.BadRequest detail,
    a retry hint as a google.rpc.RetryInfo detail."""
    details = []
    if failure.field:
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=failure.field, description=failure.message),
        ]))
    if failure.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(round(failure.retry_after_s * 1000))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    if not details:
        await context.abort(failure.code, failure.message)
    packed = []
    for detail in details:
        packed.append(any_pb2.Any())
        packed[-1].Pack(detail)
    status = status_pb2.Status(code=failure.code.value[0], message=failure.message, details=packed)
    await context.abort_with_status(rpc_status.to_status(status))


async def _reject_bad_message(bad: protocol.BadMessage, context) -> None:
    await _abort(context, GenerationFailed(grpc.StatusCode.INVALID_ARGUMENT, bad.message, bad.field))


class Gateway:
    """The gateway's lifetime: the servicers, the scheduler watcher, and draining."""

    def __init__(self, model_dir: str | Path, scheduler_address: str, model_name: str | None = None,
                 limits: GatewayLimits = DEFAULT_LIMITS) -> None:
        self.tokenizer = Tokenizer(model_dir)
        self.model_name = model_name or Path(model_dir).resolve().name
        self._changed = asyncio.Event()
        self.link = SchedulerLink(scheduler_address, on_lost=self._changed.set)
        self.core = GenerationCore(self.tokenizer, self.model_name, self.link, limits)
        self.servicer = GenerationServicer(self.core)
        self.health = protocol.HealthServicer()
        self._serving: bool | None = None
        self._log = log.get_logger()

    def add_to_server(self, server) -> None:
        server.add_generic_rpc_handlers((protocol.tolerant_handler(
            self.servicer, SERVICE, generation_pb2, _reject_bad_message),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        protocol.enable_reflection(server, (SERVICE_NAME, health.SERVICE_NAME))

    async def start(self) -> asyncio.Task:
        """NOT_SERVING (grpc's health servicer starts out SERVING), then watch the scheduler."""
        await self._set_serving(False)
        return asyncio.create_task(self.watch_scheduler(), name="scheduler-watcher")

    async def watch_scheduler(self) -> None:
        """Polls GetEngineInfo; (re)opens the stream when the scheduler is ready; keeps health current."""
        while not self.core.draining:
            try:
                info = await self.link.engine_info()
            except grpc.aio.AioRpcError:
                info = None
            if info is not None and info.ready:
                self.core.info = info
                self.link.connect()
            await self._set_serving(info is not None and info.ready and self.link.connected)
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=2.0 if self._serving else 0.25)
            except TimeoutError:
                pass

    async def _set_serving(self, serving: bool) -> None:
        if serving == self._serving or self.core.draining:
            return
        self._serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)
        self._log.info("health", serving=serving)

    async def drain(self, timeout_s: float, hurry: asyncio.Event | None = None) -> None:
        """NOT_SERVING at once; new calls get UNAVAILABLE; running ones get ``timeout_s`` to finish, or
        until ``hurry`` is set (a second SIGTERM), then end with finish reason ABORT."""
        self.core.draining = True
        await self.health.enter_graceful_shutdown()
        self._log.info("draining", requests_in_flight=self.core.num_active, timeout_s=timeout_s)
        deadline = time.monotonic() + timeout_s
        while self.core.num_active and time.monotonic() < deadline and not (hurry and hurry.is_set()):
            await asyncio.sleep(0.05)
        if self.core.num_active:
            self._log.warning("drain ended early: aborting requests" if hurry and hurry.is_set() else
                              "drain timeout: aborting requests", requests_in_flight=self.core.num_active)
            self.link.broadcast(SHUTDOWN)
            deadline = time.monotonic() + 2.0
            while self.core.num_active and time.monotonic() < deadline:
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        await self.link.close()
        self.core.tokenizer_pool.close()


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def serve(args: argparse.Namespace) -> int:
    logger = log.get_logger()
    limits = GatewayLimits.from_args(args)
    secure = SecurityConfig.from_args(args)
    gateway = Gateway(args.model, args.scheduler, args.model_name, limits)
    server = make_server(gateway, limits, secure)
    servers = [server]
    address = _format_address(args.host, args.port)
    try:
        port = add_port(server, address, secure)
        if secure.health_port is not None:
            servers.append(health_server := grpc.aio.server(options=[("grpc.so_reuseport", 0)]))
            health_pb2_grpc.add_HealthServicer_to_server(gateway.health, health_server)
            health_port = health_server.add_insecure_port(_format_address(args.host, secure.health_port))
    except RuntimeError as exc:  # grpc's "Failed to bind": the port is taken or the address is not ours
        logger.error("cannot listen", address=address, error=str(exc))
        return 1
    if args.host not in LOOPBACK_HOSTS and not (secure.tls or secure.auth_token_file):
        logger.warning("listening beyond loopback without TLS or a token: anyone who reaches this port can "
                       "generate; see --tls-cert and --auth-token-file", address=address)
    watcher = await gateway.start()
    for srv in servers:
        await srv.start()
    if args.port_file:
        if len(servers) > 1:
            _write_atomically(Path(f"{args.port_file}.health"), health_port)
        _write_atomically(Path(args.port_file), port)  # last: the launcher reads the health port after it
    logger.info("gateway listening", address=_format_address(args.host, port), model=gateway.model_name,
                scheduler=args.scheduler, tls=secure.tls, mutual_tls=bool(secure.tls_client_ca),
                token=bool(secure.auth_token_file))
    stop, hurry = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:  # the first signal drains, a second one ends the drain at once
        (hurry if stop.is_set() else stop).set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    await stop.wait()
    await gateway.drain(args.drain_timeout, hurry)
    watcher.cancel()
    for srv in servers:
        await srv.stop(grace=1.0)
    await gateway.close()
    logger.info("gateway stopped")
    return 0


def make_server(gateway: Gateway, limits: GatewayLimits, secure: SecurityConfig) -> grpc.aio.Server:
    """The public server: the gateway's services behind the size limit and the token check."""
    server = grpc.aio.server(interceptors=security.interceptors(secure), options=[
        ("grpc.max_receive_message_length", limits.max_request_bytes),
        ("grpc.max_send_message_length", 64 * 2**20),
        ("grpc.so_reuseport", 0),  # a second gateway on the same port must fail, not share it
    ])
    gateway.add_to_server(server)
    return server


def add_port(server: grpc.aio.Server, address: str, secure: SecurityConfig) -> int:
    """Listens on ``address`` (TLS when configured); returns the port; RuntimeError when it cannot."""
    if secure.tls:
        return server.add_secure_port(address, security.server_credentials(secure))
    return server.add_insecure_port(address)


def _write_atomically(path: Path, port: int) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(f"{port}\n")
    tmp.replace(path)  # atomic: a reader never sees a partial file


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="pagedserve gateway")
    p.description = ("Run a gateway: the public GenerationService (tokenize, validate, stream text) in front "
                     "of a scheduler.")
    p.add_argument("--model", required=True, help="checkpoint directory (its tokenizer.json is used)")
    p.add_argument("--scheduler", required=True, help="the scheduler's gRPC address (host:port or unix:PATH)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=50051, help="port to listen on; 0 picks a free one (default 50051)")
    p.add_argument("--model-name", default=None, help="model name clients may send (default: the directory's name)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds running streams get to finish after SIGTERM (default 30)")
    p.add_argument("--log-level", default="info", help="debug, info, warning or error (default info)")
    p.add_argument("--log-format", default="auto", choices=log.FORMATS,
                   help="auto: JSON unless stderr is a terminal (default auto)")
    p.add_argument("--port-file", default=None, help=argparse.SUPPRESS)  # the launcher learns the port here
    add_limit_arguments(p.add_argument_group("limits (checked before any work is done on a request)"))
    add_security_arguments(p.add_argument_group("security (all off by default)"))
    lifetime.add_argument(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        GatewayLimits.from_args(args)
        SecurityConfig.from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    log.configure("gateway", args.log_level, args.log_format)
    if args.exit_with_parent:
        lifetime.exit_with_parent()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
