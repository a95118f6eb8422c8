"""The gateway process: pagedserve.v1.GenerationService in front of one scheduler (grpc.aio).

Stateless between requests. A request's life (validate, tokenize, submit over the one Connect stream
kept to the scheduler, text deltas out) is GenerationCore's (generation.py); this module is its gRPC
face, plus grpc.health.v1, server reflection, the scheduler watcher and draining. Health is SERVING only while the
scheduler reports ready, the stream is open and the gateway is not draining. Chat renders the model's chat
template (chat.py) and then runs as Generate. With --http-port the OpenAI-compatible HTTP API
(openai_http.py) serves the same GenerationCore from the same event loop.

    pagedserve gateway --model DIR --scheduler HOST:PORT --port 50051 [--http-port 8000]
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
from pagedserve.v1 import generation_pb2, generation_pb2_grpc
from scheduler_svc import log
from scheduler_svc.gateway.chat import ChatPrompts, ChatTemplate
from scheduler_svc.gateway.generation import SHUTDOWN, GenerationCore, GenerationFailed
from scheduler_svc.gateway.scheduler_link import SchedulerLink
from scheduler_svc.gateway.tokenizer import Tokenizer
from scheduler_svc.gateway.validation import ModelLimits, check_model
from scheduler_svc.sampling_params import InvalidField

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name


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
    """The gateway's lifetime: the servicers, the scheduler watcher, and draining."""

    def __init__(self, model_dir: str | Path, scheduler_address: str, model_name: str | None = None) -> None:
        self.tokenizer = Tokenizer(model_dir)
        self.model_name = model_name or Path(model_dir).resolve().name
        self._changed = asyncio.Event()
        self.link = SchedulerLink(scheduler_address, on_lost=self._changed.set)
        self.core = GenerationCore(self.tokenizer, self.model_name, self.link)
        self.chat = ChatPrompts(self.core, ChatTemplate.from_model(model_dir, self.tokenizer.id_to_token))
        self.servicer = GenerationServicer(self.core, self.chat)
        self.health = health.aio.HealthServicer()
        self._serving: bool | None = None
        self._log = log.get_logger()

    def add_to_server(self, server) -> None:
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )

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
            self.link.broadcast(SHUTDOWN)
            deadline = time.monotonic() + 2.0
            while self.core.num_active and time.monotonic() < deadline:
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        await self.link.close()


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _write_port_file(path: str | None, port: int) -> None:
    if path:
        tmp = Path(f"{path}.tmp")
        tmp.write_text(f"{port}\n")
        tmp.replace(path)  # atomic: a reader never sees a partial file


async def _start_http(args: argparse.Namespace, gateway: Gateway):
    """The OpenAI-compatible HTTP server on --http-port, in this event loop; None without the flag."""
    if args.http_port is None:
        return None
    from scheduler_svc.gateway.openai_http import OpenAIServer  # aiohttp: only when serving HTTP

    http = OpenAIServer(gateway.core, gateway.chat)
    port = await http.start(args.host, args.http_port)
    _write_port_file(args.http_port_file, port)
    log.get_logger().info("http listening", address=_format_address(args.host, port), api="openai")
    return http


async def serve(args: argparse.Namespace) -> int:
    logger = log.get_logger()
    gateway = Gateway(args.model, args.scheduler, args.model_name)
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", 64 * 2**20),
        ("grpc.max_send_message_length", 64 * 2**20),
        ("grpc.so_reuseport", 0),  # a second gateway on the same port must fail, not share it
    ])
    gateway.add_to_server(server)
    port = server.add_insecure_port(_format_address(args.host, args.port))
    watcher = await gateway.start()
    await server.start()
    http = await _start_http(args, gateway)
    _write_port_file(args.port_file, port)
    logger.info("gateway listening", address=_format_address(args.host, port), model=gateway.model_name,
                scheduler=args.scheduler)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await gateway.drain(args.drain_timeout)
    watcher.cancel()
    if http is not None:
        await http.stop()
    await server.stop(grace=1.0)
    await gateway.close()
    logger.info("gateway stopped")
    return 0


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="pagedserve gateway")
    p.description = ("Run a gateway: the public GenerationService (tokenize, validate, stream text) in front "
                     "of a scheduler.")
    p.add_argument("--model", required=True, help="checkpoint directory (its tokenizer.json is used)")
    p.add_argument("--scheduler", required=True, help="the scheduler's gRPC address (host:port or unix:PATH)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=50051, help="port to listen on; 0 picks a free one (default 50051)")
    p.add_argument("--model-name", default=None, help="model name clients may send (default: the directory's name)")
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                   "/v1/models) on this port; 0 picks a free one (default: off)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds running streams get to finish after SIGTERM (default 30)")
    p.add_argument("--log-level", default="info", help="debug, info, warning or error (default info)")
    p.add_argument("--log-format", default="auto", choices=log.FORMATS,
                   help="auto: JSON unless stderr is a terminal (default auto)")
    p.add_argument("--port-file", default=None, help=argparse.SUPPRESS)  # the launcher learns the port here
    p.add_argument("--http-port-file", default=None, help=argparse.SUPPRESS)  # and the HTTP port here
    lifetime.add_argument(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log.configure("gateway", args.log_level, args.log_format)
    if args.exit_with_parent:
        lifetime.exit_with_parent()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
