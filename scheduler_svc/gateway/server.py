"""The gateway process: pagedserve.v1.GenerationService in front of one or more engines (grpc.aio).

Stateless between requests. A request's life (validate, tokenize, submit over the Connect stream kept
to the engine the router picks, text deltas out) is GenerationCore's (generation.py); the engines, their
discovery and the router are engines.py's; this module is the gRPC face, plus LoadService,
grpc.health.v1, server reflection, health upkeep, metrics and draining. Health is SERVING while at least
one engine reports ready with its stream open, and the gateway is not draining. Requests larger than
``--max-request-bytes`` are refused by gRPC before any of them is read into a message; TLS, mTLS and
token authentication are optional (security.py). Chat renders the model's chat template (chat.py) and
then runs as Generate. With --http-port the OpenAI-compatible HTTP API (openai_http.py) serves the same
GenerationCore from the same event loop, with the same TLS and token.

    pagedserve gateway --model DIR --scheduler HOST:PORT[,HOST:PORT...] --port 50051 [--http-port 8000]
    pagedserve gateway --model DIR --scheduler dns:pagedserve-engine:50052 --metrics-port 9090
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from gpu_worker import lifetime, log
from pagedserve.v1 import generation_pb2, generation_pb2_grpc, load_pb2_grpc
from scheduler_svc import metrics
from scheduler_svc.gateway import load_service, protocol, security
from scheduler_svc.gateway.chat import ChatPrompts, ChatTemplate
from scheduler_svc.gateway.engines import EnginePool, format_address, parse_engines
from scheduler_svc.gateway.generation import SHUTDOWN, GenerationCore, GenerationFailed
from scheduler_svc.gateway.http_options import HttpLimits, add_http_arguments
from scheduler_svc.gateway.metrics import GatewayMetrics
from scheduler_svc.gateway.options import (
    DEFAULT_KEEPALIVE_S,
    DEFAULT_LIMITS,
    GatewayLimits,
    SecurityConfig,
    add_keepalive_argument,
    add_limit_arguments,
    add_security_arguments,
    read_token,
)
from scheduler_svc.gateway.router import POLICIES, Router
from scheduler_svc.gateway.scheduler_link import channel_options
from scheduler_svc.gateway.tokenizer import Tokenizer
from scheduler_svc.gateway.tool_parsers import PARSERS

SERVICE = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"]
SERVICE_NAME = SERVICE.full_name
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "[::1]", "localhost")
MAX_STATUS_MESSAGE_CHARS = 1024  # twice: as the message and in the BadRequest detail, well under 8 KiB


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    """The gRPC face of GenerationCore: requests in, response batches written to the stream, a
    GenerationFailed as the call's status (INVALID_ARGUMENT with a google.rpc.BadRequest detail)."""

    def __init__(self, core: GenerationCore, chat: ChatPrompts) -> None:
        self.core = core
        self.chat = chat

    async def Generate(self, request, context):
        await self._stream(request, context)

    async def Chat(self, request, context):
        try:
            generate = await self.chat.from_proto(request)
        except GenerationFailed as exc:
            await _abort(context, exc)
        await self._stream(generate, context)

    async def _stream(self, request: generation_pb2.GenerateRequest, context) -> None:
        def cancel_status() -> str:
            remaining = context.time_remaining()
            return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"

        try:
            # aclosing: a cancelled call releases its request (and aborts it upstream) at once, not when
            # the generator is collected.
            async with contextlib.aclosing(self.core.generate(request, cancel_status)) as batches:
                async for batch in batches:
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
    a retry hint as a google.rpc.RetryInfo detail. The message is clipped: it travels in a trailer, and
    one over gRPC's metadata limit (8 KiB) would reach the client as RESOURCE_EXHAUSTED instead."""
    if len(failure.message) > MAX_STATUS_MESSAGE_CHARS:
        failure = GenerationFailed(failure.code, failure.message[:MAX_STATUS_MESSAGE_CHARS - 1] + "…", failure.field,
                                   failure.retry_after_s)
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
    """The gateway's lifetime: the servicers, the engines, health, and draining."""

    def __init__(self, model_dir: str | Path, scheduler_address: str, model_name: str | None = None,
                 router: Router | None = None, dns_refresh_s: float = 5.0,
                 limits: GatewayLimits = DEFAULT_LIMITS, scheduler_keepalive_s: float = DEFAULT_KEEPALIVE_S) -> None:
        self.tokenizer = Tokenizer(model_dir)
        self.model_name = model_name or Path(model_dir).resolve().name
        self._changed = asyncio.Event()
        self.metrics = GatewayMetrics(self.model_name)
        self.engines = EnginePool(scheduler_address, router or Router(), self.metrics, on_change=self._changed.set,
                                  dns_refresh_s=dns_refresh_s, keepalive_s=scheduler_keepalive_s)
        self.core = GenerationCore(self.tokenizer, self.model_name, self.engines, self.metrics, limits)
        self.chat = ChatPrompts(self.core, ChatTemplate.from_model(model_dir, self.tokenizer.id_to_token))
        self.servicer = GenerationServicer(self.core, self.chat)
        self.load_servicer = load_service.LoadServicer(self.engines, self.model_name)
        self.health = protocol.HealthServicer()
        self._serving: bool | None = None
        self._log = log.get_logger()

    def add_to_server(self, server) -> None:
        server.add_generic_rpc_handlers((protocol.tolerant_handler(
            self.servicer, SERVICE, generation_pb2, _reject_bad_message),))
        load_pb2_grpc.add_LoadServiceServicer_to_server(self.load_servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        protocol.enable_reflection(server, (SERVICE_NAME, load_service.SERVICE_NAME, health.SERVICE_NAME))

    async def start(self) -> asyncio.Task:
        """NOT_SERVING (grpc's health servicer starts out SERVING), then find and watch the engines."""
        await self._set_serving(False)
        await self.engines.start()
        return asyncio.create_task(self.keep_health(), name="health")

    async def keep_health(self) -> None:
        """SERVING while any engine is ready; the model's description from a ready engine."""
        while not self.core.draining:
            self._changed.clear()
            info = self.engines.info
            if info is not None:
                self.core.info = info
            await self._set_serving(self.engines.connected)
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=2.0)
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
            self.engines.broadcast(SHUTDOWN)
            deadline = time.monotonic() + 2.0
            while self.core.num_active and time.monotonic() < deadline:
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        await self.engines.close()
        self.core.tokenizer_pool.close()


async def _start_http(args: argparse.Namespace, gateway: Gateway, secure: SecurityConfig):
    """The OpenAI-compatible HTTP server on --http-port, in this event loop, with the gRPC port's TLS and
    token; None without the flag."""
    if args.http_port is None:
        return None
    from scheduler_svc.gateway.openai_http import OpenAIServer  # aiohttp: only when serving HTTP

    token = read_token(secure.auth_token_file) if secure.auth_token_file else None
    http = OpenAIServer(gateway.core, gateway.chat, token, HttpLimits.from_args(args),
                        tool_call_parser=args.tool_call_parser)
    port = await http.start(args.host, args.http_port, security.http_ssl_context(secure), args.reuse_port)
    if args.http_port_file:
        _write_atomically(Path(args.http_port_file), port)
    log.get_logger().info("http listening", address=format_address(args.host, port), api="openai", tls=secure.tls)
    return http


async def serve(args: argparse.Namespace) -> int:
    logger = log.get_logger()
    router = Router(args.routing, args.affinity_blocks)
    limits = GatewayLimits.from_args(args)
    secure = SecurityConfig.from_args(args)
    gateway = Gateway(args.model, args.scheduler, args.model_name, router, args.dns_refresh, limits,
                      args.scheduler_keepalive)
    server = make_server(gateway, limits, secure, args.reuse_port)
    servers = [server]
    address = format_address(args.host, args.port)
    try:
        port = add_port(server, address, secure)
        if args.local_socket:  # private to the launcher, which asks this very gateway's health here
            server.add_insecure_port(f"unix:{args.local_socket}")
        if secure.health_port is not None:
            servers.append(health_server := grpc.aio.server(
                options=[("grpc.so_reuseport", 1 if args.reuse_port else 0)]))
            health_pb2_grpc.add_HealthServicer_to_server(gateway.health, health_server)
            health_port = health_server.add_insecure_port(format_address(args.host, secure.health_port))
    except RuntimeError as exc:  # grpc's "Failed to bind": the port is taken or the address is not ours
        logger.error("cannot listen", address=address, error=str(exc))
        return 1
    if args.host not in LOOPBACK_HOSTS and not (secure.tls or secure.auth_token_file):
        logger.warning("listening beyond loopback without TLS or a token: anyone who reaches this port can "
                       "generate; see --tls-cert and --auth-token-file", address=address)
    watcher = await gateway.start()
    for srv in servers:
        await srv.start()
    http = await _start_http(args, gateway, secure)
    if args.port_file:
        if len(servers) > 1:
            _write_atomically(Path(f"{args.port_file}.health"), health_port)
        _write_atomically(Path(args.port_file), port)  # last: a reader of it finds the health port too
    logger.info("gateway listening", address=format_address(args.host, port), model=gateway.model_name,
                scheduler=args.scheduler, routing=args.routing, tls=secure.tls,
                mutual_tls=bool(secure.tls_client_ca), token=bool(secure.auth_token_file))
    if args.metrics_port is not None:
        logger.info("metrics", port=metrics.serve_metrics(args.metrics_port, args.metrics_host), host=args.metrics_host)
    stop, hurry = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:  # the first signal drains, a second one ends the drain at once
        (hurry if stop.is_set() else stop).set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    await stop.wait()
    await gateway.drain(args.drain_timeout, hurry)
    watcher.cancel()
    if http is not None:
        await http.stop()
    for srv in servers:
        await srv.stop(grace=1.0)
    await gateway.close()
    logger.info("gateway stopped")
    return 0


# grpc.aio accepts one call per pass of the event loop; calls that arrive faster wait in grpc core's
# queue of unaccepted calls, and grpc cancels those older than grpc.server_max_unrequested_time_in_server
# (30 s by default) without a word: in a burst of 2,000 streams on a busy gateway, 1-165 calls ended
# CANCELLED that no handler ever saw (no log line, no metric). A waiting call is left to its own
# deadline instead; this bound only clears calls that a stuck gateway will never accept.
MAX_UNACCEPTED_S = 3600


def make_server(gateway: Gateway, limits: GatewayLimits, secure: SecurityConfig,
                reuse_port: bool = False) -> grpc.aio.Server:
    """The public server: the gateway's services behind the size limit and the token check."""
    server = grpc.aio.server(interceptors=security.interceptors(secure), options=[
        ("grpc.max_receive_message_length", limits.max_request_bytes),
        ("grpc.max_send_message_length", 64 * 2**20),
        ("grpc.server_max_unrequested_time_in_server", MAX_UNACCEPTED_S),
        # Alone, a second gateway on the same port must fail, not share it; `serve --gateways N` starts
        # its N gateways with --reuse-port after checking that nothing else holds the port.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
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
    p.add_argument("--scheduler", required=True,
                   help="the engines' schedulers: ADDR[,ADDR...] (host:port or unix:PATH), or dns:NAME:PORT, a name "
                   "re-resolved every --dns-refresh seconds (a headless Service in Kubernetes)")
    p.add_argument("--routing", default="prefix", choices=POLICIES,
                   help="prefix: prefix-cache affinity bounded by load, else least loaded (default); least-loaded; "
                   "round-robin (for comparison)")
    p.add_argument("--affinity-blocks", type=int, default=4,
                   help="prefix routing keys a prompt by its first N full KV blocks (default 4)")
    p.add_argument("--dns-refresh", type=float, default=5.0, help="seconds between lookups of dns:NAME (default 5)")
    add_keepalive_argument(p)
    metrics.add_arguments(p)
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=50051, help="port to listen on; 0 picks a free one (default 50051)")
    p.add_argument("--model-name", default=None, help="model name clients may send (default: the directory's name)")
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                   "/v1/models) on this port; 0 picks a free one (default: off)")
    p.add_argument("--tool-call-parser", choices=tuple(PARSERS), default=None,
                   help="tool-call format of the model's output on /v1/chat/completions: hermes, llama3_json "
                   "or mistral (default: chosen from the chat template's markers; hermes when it has none)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds running streams get to finish after SIGTERM (default 30)")
    log.add_arguments(p)
    p.add_argument("--reuse-port", action="store_true",
                   help="share the port with other gateways (SO_REUSEPORT; the kernel spreads connections)")
    p.add_argument("--port-file", default=None, help=argparse.SUPPRESS)  # the launcher learns the port here
    # Also listen here, a unix socket private to the launcher, which asks this very gateway's health.
    p.add_argument("--local-socket", default=None, help=argparse.SUPPRESS)
    p.add_argument("--http-port-file", default=None, help=argparse.SUPPRESS)  # and the HTTP port here
    add_limit_arguments(p.add_argument_group("limits (checked before any work is done on a request)"))
    add_security_arguments(p.add_argument_group("security (all off by default)"))
    add_http_arguments(p.add_argument_group("the HTTP port's timeouts and caps (with --http-port)"))
    lifetime.add_argument(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        Router(args.routing, args.affinity_blocks)
        parse_engines(args.scheduler)
        GatewayLimits.from_args(args)
        SecurityConfig.from_args(args)
        HttpLimits.from_args(args)
        channel_options(args.scheduler_keepalive)
    except ValueError as exc:
        parser.error(str(exc))
    log.configure("gateway", args.log_level, args.log_format)
    if args.exit_with_parent:
        lifetime.exit_with_parent()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
