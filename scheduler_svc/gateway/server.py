"""The gateway process: pagedserve.v1.GenerationService in front of one or more engines (grpc.aio).

Stateless between requests. A request's life (validate, tokenize, submit over the Connect stream kept
to the engine the router picks, text deltas out) is GenerationCore's (generation.py); the engines, their
discovery and the router are engines.py's; this module is the gRPC face, plus LoadService,
grpc.health.v1, server reflection, health upkeep, metrics and draining. Health is SERVING while at least
one engine reports ready with its stream open, and the gateway is not draining.

    pagedserve gateway --model DIR --scheduler HOST:PORT[,HOST:PORT...] --port 50051
    pagedserve gateway --model DIR --scheduler dns:pagedserve-engine:50052 --metrics-port 9090
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
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

import clients  # noqa: F401
from gpu_worker import lifetime
from pagedserve.v1 import generation_pb2, generation_pb2_grpc, load_pb2_grpc
from scheduler_svc import log, metrics
from scheduler_svc.gateway import load_service
from scheduler_svc.gateway.engines import EnginePool, parse_engines
from scheduler_svc.gateway.generation import SHUTDOWN, GenerationCore, GenerationFailed
from scheduler_svc.gateway.metrics import GatewayMetrics
from scheduler_svc.gateway.router import POLICIES, Router
from scheduler_svc.gateway.tokenizer import Tokenizer
from scheduler_svc.gateway.validation import ModelLimits, check_model
from scheduler_svc.sampling_params import InvalidField

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name


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
            check_model(request.model, ModelLimits(self.core.model_name, 0, 0))
        except InvalidField as exc:
            await _abort(context, GenerationFailed(grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.field))
        ids = await self.core.tokenize(request.text)
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
    if not failure.field:
        await context.abort(failure.code, failure.message)
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field=failure.field, description=failure.message),
    ]))
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=failure.message, details=[detail])
    await context.abort_with_status(rpc_status.to_status(status))


class Gateway:
    """The gateway's lifetime: the servicers, the engines, health, and draining."""

    def __init__(self, model_dir: str | Path, scheduler_address: str, model_name: str | None = None,
                 router: Router | None = None, dns_refresh_s: float = 5.0) -> None:
        self.tokenizer = Tokenizer(model_dir)
        self.model_name = model_name or Path(model_dir).resolve().name
        self._changed = asyncio.Event()
        self.metrics = GatewayMetrics(self.model_name)
        self.engines = EnginePool(scheduler_address, router or Router(), self.metrics, on_change=self._changed.set,
                                  dns_refresh_s=dns_refresh_s)
        self.core = GenerationCore(self.tokenizer, self.model_name, self.engines, self.metrics)
        self.servicer = GenerationServicer(self.core)
        self.load_servicer = load_service.LoadServicer(self.engines, self.model_name)
        self.health = health.aio.HealthServicer()
        self._serving: bool | None = None
        self._log = log.get_logger()

    def add_to_server(self, server) -> None:
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(self.servicer, server)
        load_pb2_grpc.add_LoadServiceServicer_to_server(self.load_servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, load_service.SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )

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

    async def drain(self, timeout_s: float) -> None:
        """NOT_SERVING at once; new calls get UNAVAILABLE; running ones get ``timeout_s`` to finish."""
        self.core.draining = True
        await self.health.enter_graceful_shutdown()
        self._log.info("draining", requests_in_flight=self.core.num_active, timeout_s=timeout_s)
        deadline = time.monotonic() + timeout_s
        while self.core.num_active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.core.num_active:
            self._log.warning("drain timeout: aborting requests", requests_in_flight=self.core.num_active)
            self.engines.broadcast(SHUTDOWN)
            deadline = time.monotonic() + 2.0
            while self.core.num_active and time.monotonic() < deadline:
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        await self.engines.close()


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def serve(args: argparse.Namespace) -> int:
    logger = log.get_logger()
    router = Router(args.routing, args.affinity_blocks)
    gateway = Gateway(args.model, args.scheduler, args.model_name, router, args.dns_refresh)
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", 64 * 2**20),
        ("grpc.max_send_message_length", 64 * 2**20),
        # Alone, a second gateway on the same port must fail, not share it; `serve --gateways N` starts
        # its N gateways with --reuse-port after checking that nothing else holds the port.
        ("grpc.so_reuseport", 1 if args.reuse_port else 0),
    ])
    gateway.add_to_server(server)
    port = server.add_insecure_port(_format_address(args.host, args.port))
    if args.local_socket:
        server.add_insecure_port(f"unix:{args.local_socket}")
    watcher = await gateway.start()
    await server.start()
    if args.port_file:
        tmp = Path(f"{args.port_file}.tmp")
        tmp.write_text(f"{port}\n")
        tmp.replace(args.port_file)  # atomic: a reader never sees a partial file
    logger.info("gateway listening", address=_format_address(args.host, port), model=gateway.model_name,
                scheduler=args.scheduler, routing=args.routing)
    if args.metrics_port is not None:
        logger.info("metrics", port=metrics.serve_metrics(args.metrics_port, args.host))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await gateway.drain(args.drain_timeout)
    watcher.cancel()
    await server.stop(grace=1.0)
    await gateway.close()
    logger.info("gateway stopped")
    return 0


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
    metrics.add_arguments(p)
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=50051, help="port to listen on; 0 picks a free one (default 50051)")
    p.add_argument("--model-name", default=None, help="model name clients may send (default: the directory's name)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds running streams get to finish after SIGTERM (default 30)")
    p.add_argument("--log-level", default="info", help="debug, info, warning or error (default info)")
    p.add_argument("--log-format", default="auto", choices=log.FORMATS,
                   help="auto: JSON unless stderr is a terminal (default auto)")
    p.add_argument("--reuse-port", action="store_true",
                   help="share the port with other gateways (SO_REUSEPORT; the kernel spreads connections)")
    p.add_argument("--port-file", default=None, help=argparse.SUPPRESS)  # the launcher learns the port here
    # Also listen here, a unix socket private to the launcher, which asks this very gateway's health.
    p.add_argument("--local-socket", default=None, help=argparse.SUPPRESS)
    lifetime.add_argument(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        Router(args.routing, args.affinity_blocks)
        parse_engines(args.scheduler)
    except ValueError as exc:
        parser.error(str(exc))
    log.configure("gateway", args.log_level, args.log_format)
    if args.exit_with_parent:
        lifetime.exit_with_parent()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
