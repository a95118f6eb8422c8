"""The gateway process: pagedserve.v1.GenerationService in front of one scheduler (grpc.aio).

Stateless between requests. It tokenizes and validates, submits token ids over the one Connect stream
it keeps to the scheduler (scheduler_link), turns the scheduler's per-step outputs into text deltas
(response_stream), and serves grpc.health.v1 and server reflection. Health is SERVING only while the
scheduler reports ready, the stream is open and the gateway is not draining.

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
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

import clients  # noqa: F401
from gpu_worker import lifetime
from pagedserve.internal.v1 import scheduler_pb2
from pagedserve.v1 import generation_pb2, generation_pb2_grpc
from scheduler_svc import finish_reason, log
from scheduler_svc.gateway.detokenizer import byte_fallback_ids
from scheduler_svc.gateway.response_stream import SampleStream, stop_token_ids
from scheduler_svc.gateway.scheduler_link import DuplicateRequest, LinkDown, LinkLost, SchedulerLink
from scheduler_svc.gateway.tokenizer import Tokenizer
from scheduler_svc.gateway.validation import ModelLimits, check_model, public_field, validate
from scheduler_svc.sampling_params import InvalidField

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
SHUTDOWN = object()  # queued to requests still running when the drain period is over
TOKENIZE_INLINE_CHARS = 4096  # longer prompts are tokenized in a thread, off the event loop


class _Failed(Exception):
    """Ends a Generate call with a status; ``field`` adds a google.rpc.BadRequest detail."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str = "") -> None:
        super().__init__(message)
        self.code, self.message, self.field = code, message, field


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, tokenizer: Tokenizer, model_name: str, link: SchedulerLink) -> None:
        self.tokenizer = tokenizer
        self.byte_token_ids = byte_fallback_ids(tokenizer.id_to_token, tokenizer.vocab_size)
        self.model_name = model_name
        self.link = link
        self.info: scheduler_pb2.EngineInfo | None = None  # set by the watcher once the scheduler is ready
        self.draining = False
        self.num_active = 0
        self._log = log.get_logger()

    @property
    def limits(self) -> ModelLimits:
        if self.info is None or not self.link.connected:
            raise _Failed(grpc.StatusCode.UNAVAILABLE, "the scheduler is not ready")
        return ModelLimits(self.model_name, self.info.vocab_size, self.info.max_model_len)

    # ---- Generate

    async def Generate(self, request, context):
        start = time.monotonic()
        self.num_active += 1
        summary = {"status": "OK", "prompt_tokens": 0, "completion_tokens": 0}
        request_id = request.request_id
        samples: dict[int, SampleStream] = {}
        submitted = False
        try:
            if self.draining:
                raise _Failed(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down")
            valid = await self._validate(request)
            request_id = valid.request_id
            summary["prompt_tokens"] = len(valid.prompt_token_ids)
            new_sample = self._sample_factory(valid.params)
            # n samples stream side by side; beams join as the search reports them (all in its last step).
            samples = {i: new_sample(i) for i in range(valid.params.n)}
            try:
                queue = self.link.submit(request_id, valid.prompt_token_ids, valid.params.to_proto())
            except LinkDown as exc:
                raise _Failed(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
            except DuplicateRequest:
                raise _Failed(grpc.StatusCode.ALREADY_EXISTS, f"request {request_id!r} is already running") from None
            submitted = True
            usage = generation_pb2.Usage(prompt_tokens=len(valid.prompt_token_ids))
            while not all(s.sent_final for s in samples.values()):
                items = [await queue.get()]
                while not queue.empty():  # coalesce whatever arrived while we were writing
                    items.append(queue.get_nowait())
                for item in items:
                    self._apply(item, samples, usage, new_sample if valid.params.beam_width > 1 else None)
                if "time_to_first_token_s" not in summary and any(s.num_tokens for s in samples.values()):
                    summary["time_to_first_token_s"] = round(time.monotonic() - start, 6)
                for sample in samples.values():
                    resp = sample.take_response(request_id, usage)
                    if resp is not None:
                        await context.write(resp)
        except _Failed as exc:
            summary["status"] = exc.code.name
            summary["error"] = exc.message
            await _abort(context, exc)
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            summary["status"] = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
            raise
        except Exception as exc:  # a bug or a broken transport: grpc reports UNKNOWN to the client
            summary["status"] = "UNKNOWN"
            summary["error"] = repr(exc)
            raise
        finally:
            self.num_active -= 1
            if submitted:
                self.link.release(request_id, abort=not all(s.upstream_finished for s in samples.values()))
            self._summarize(request_id or "-", start, summary, samples)

    def _sample_factory(self, params):
        stop_ids = stop_token_ids(params, self.info.eos_token_ids)
        return lambda index: SampleStream(index, params, self.tokenizer.decode, stop_ids, self.byte_token_ids)

    async def _validate(self, request):
        limits = self.limits
        try:
            if request.WhichOneof("prompt") == "text" and len(request.text) > TOKENIZE_INLINE_CHARS:
                return await asyncio.to_thread(validate, request, limits, self.tokenizer.encode)
            return validate(request, limits, self.tokenizer.encode)
        except InvalidField as exc:
            raise _Failed(grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.field) from None

    def _apply(self, item, samples: dict[int, SampleStream], usage: generation_pb2.Usage, new_beam=None) -> None:
        if isinstance(item, LinkLost):
            raise _Failed(grpc.StatusCode.UNAVAILABLE, f"lost the scheduler: {item.reason}")
        if item is SHUTDOWN:
            for s in samples.values():
                s.finish(generation_pb2.FINISH_REASON_ABORT)
            return
        if item.finish_reason == scheduler_pb2.FINISH_REASON_ERROR:
            for s in samples.values():
                s.upstream_finished = True  # a failed request holds nothing in the scheduler
            raise _scheduler_error(item)
        sample = samples.get(item.index)
        if sample is None:
            if new_beam is None:
                return
            sample = samples[item.index] = new_beam(item.index)
        usage.cached_prompt_tokens = item.num_cached_tokens
        sample.feed(item)

    def _summarize(self, request_id: str, start: float, summary: dict, samples: dict[int, SampleStream]) -> None:
        summary["completion_tokens"] = sum(s.num_tokens for s in samples.values())
        reasons = [finish_reason.name(s.finish_reason) for s in samples.values() if s.finished]
        if reasons:
            summary["finish_reason"] = reasons[0] if len(reasons) == 1 else ",".join(reasons)
        self._log.info("request finished", request_id=request_id, total_s=round(time.monotonic() - start, 6),
                       **summary)

    # ---- unary methods

    async def Tokenize(self, request, context):
        try:
            check_model(request.model, ModelLimits(self.model_name, 0, 0))
        except InvalidField as exc:
            await _abort(context, _Failed(grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.field))
        if len(request.text) > TOKENIZE_INLINE_CHARS:
            ids = await asyncio.to_thread(self.tokenizer.encode, request.text)
        else:
            ids = self.tokenizer.encode(request.text)
        tokens = [self.tokenizer.id_to_token(i) or "" for i in ids]
        return generation_pb2.TokenizeResponse(token_ids=ids, tokens=tokens)

    async def GetModelInfo(self, request, context):
        info = self.info
        if info is None:
            await _abort(context, _Failed(grpc.StatusCode.UNAVAILABLE, "the scheduler is not ready"))
        return generation_pb2.GetModelInfoResponse(
            model=self.model_name, architecture=info.architecture, max_model_len=info.max_model_len,
            vocab_size=info.vocab_size, block_size=info.block_size, num_kv_blocks=info.num_blocks,
            dtype=info.dtype, eos_token_ids=info.eos_token_ids,
        )


def _scheduler_error(out: scheduler_pb2.RequestOutput) -> _Failed:
    """A FINISH_REASON_ERROR output as a status: a named field is the caller's fault."""
    if out.error_field:
        field = public_field(out.error_field)
        message = out.error.removeprefix(f"{out.error_field}: ")
        return _Failed(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}", field)
    if out.error.startswith("engine failed"):
        return _Failed(grpc.StatusCode.UNAVAILABLE, out.error)
    return _Failed(grpc.StatusCode.INTERNAL, out.error or "the scheduler failed the request")


async def _abort(context, failure: _Failed) -> None:
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
        self.servicer = GenerationServicer(self.tokenizer, self.model_name, self.link)
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
        while not self.servicer.draining:
            try:
                info = await self.link.engine_info()
            except grpc.aio.AioRpcError:
                info = None
            if info is not None and info.ready:
                self.servicer.info = info
                self.link.connect()
            await self._set_serving(info is not None and info.ready and self.link.connected)
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=2.0 if self._serving else 0.25)
            except TimeoutError:
                pass

    async def _set_serving(self, serving: bool) -> None:
        if serving == self._serving or self.servicer.draining:
            return
        self._serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)
        self._log.info("health", serving=serving)

    async def drain(self, timeout_s: float) -> None:
        """NOT_SERVING at once; new calls get UNAVAILABLE; running ones get ``timeout_s`` to finish."""
        self.servicer.draining = True
        await self.health.enter_graceful_shutdown()
        self._log.info("draining", requests_in_flight=self.servicer.num_active, timeout_s=timeout_s)
        deadline = time.monotonic() + timeout_s
        while self.servicer.num_active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.servicer.num_active:
            self._log.warning("drain timeout: aborting requests", requests_in_flight=self.servicer.num_active)
            self.link.broadcast(SHUTDOWN)
            deadline = time.monotonic() + 2.0
            while self.servicer.num_active and time.monotonic() < deadline:
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        await self.link.close()


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


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
    if args.port_file:
        tmp = Path(f"{args.port_file}.tmp")
        tmp.write_text(f"{port}\n")
        tmp.replace(args.port_file)  # atomic: a reader never sees a partial file
    logger.info("gateway listening", address=_format_address(args.host, port), model=gateway.model_name,
                scheduler=args.scheduler)
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
