"""The gateway's end of the gateway<->scheduler link: one Connect stream multiplexing every request.

A request handler calls ``submit`` and reads its request's outputs from the asyncio.Queue it gets back;
one dispatcher task reads the stream and routes each RequestOutput to its request's queue. When the
stream ends, every registered queue receives a ``LinkLost`` and the link is down until ``connect``
is called again (the gateway's watcher does so when the scheduler reports ready).

Everything here runs on the gateway's event loop; no locks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import grpc

import clients  # noqa: F401
from pagedserve.internal.v1 import scheduler_pb2, scheduler_pb2_grpc
from scheduler_svc import log

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 2**20),
    ("grpc.max_send_message_length", 64 * 2**20),
    # A ping every 10 s on an open stream notices a scheduler whose host vanished without closing it.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),  # also while no request is running
]


@dataclass(frozen=True, slots=True)
class LinkLost:
    """Queued to every request in flight when the Connect stream ends."""

    reason: str


class LinkDown(RuntimeError):
    """No Connect stream is open."""


class DuplicateRequest(ValueError):
    """A request with this id is already in flight on this gateway."""


class SchedulerLink:
    def __init__(self, address: str, on_lost: Callable[[], None] | None = None,
                 on_load: Callable[[scheduler_pb2.EngineLoad], None] | None = None) -> None:
        self.address = address
        self.on_lost = on_lost
        self.on_load = on_load  # the engine's load reports, as they arrive on the stream
        self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = scheduler_pb2_grpc.SchedulerServiceStub(self._channel)
        self._routes: dict[str, asyncio.Queue] = {}
        self._outbox: asyncio.Queue | None = None  # GatewayMessages up the open stream; None when down
        self._dispatcher: asyncio.Task | None = None
        self._log = log.get_logger(scheduler=address)

    @property
    def connected(self) -> bool:
        return self._outbox is not None

    @property
    def num_in_flight(self) -> int:
        return len(self._routes)

    async def engine_info(self, timeout_s: float = 2.0) -> scheduler_pb2.EngineInfo:
        return await self._stub.GetEngineInfo(scheduler_pb2.GetEngineInfoRequest(), timeout=timeout_s)

    def connect(self) -> None:
        """Opens the Connect stream; a refusal or a later break shows up as LinkLost in the queues."""
        if self.connected:
            return
        outbox: asyncio.Queue = asyncio.Queue()
        call = self._stub.Connect(_messages(outbox))
        self._outbox = outbox
        self._dispatcher = asyncio.create_task(self._dispatch(call, outbox), name="scheduler-dispatcher")
        self._log.info("scheduler stream opened")

    # ---- requests

    def submit(self, request_id: str, prompt_token_ids: list[int], params: scheduler_pb2.SamplingParams):
        """Sends a Submit; returns the queue that receives the request's RequestOutputs (or LinkLost)."""
        if self._outbox is None:
            raise LinkDown("not connected to the scheduler")
        if request_id in self._routes:
            raise DuplicateRequest(request_id)
        queue: asyncio.Queue = asyncio.Queue()
        self._routes[request_id] = queue
        self._outbox.put_nowait(scheduler_pb2.GatewayMessage(submit=scheduler_pb2.Submit(
            request_id=request_id, prompt_token_ids=prompt_token_ids, sampling_params=params,
        )))
        return queue

    def release(self, request_id: str, abort: bool) -> None:
        """Forgets a request; with ``abort`` the scheduler ends it and frees its blocks within a step.

        Synchronous on purpose: it runs in ``finally`` blocks of cancelled handlers."""
        self._routes.pop(request_id, None)
        if abort and self._outbox is not None:
            self._outbox.put_nowait(scheduler_pb2.GatewayMessage(abort=scheduler_pb2.Abort(request_id=request_id)))

    def broadcast(self, item: object) -> None:
        """Queues ``item`` to every request in flight (used to end them at shutdown)."""
        for queue in self._routes.values():
            queue.put_nowait(item)

    # ---- the stream

    async def _dispatch(self, call, outbox: asyncio.Queue) -> None:
        reason = "the scheduler ended the stream"
        try:
            async for event in call:
                for out in event.outputs:
                    queue = self._routes.get(out.request_id)
                    if queue is not None:  # else: released already (cancelled, or stopped here)
                        queue.put_nowait(out)
                if self.on_load is not None and event.HasField("load"):
                    self.on_load(event.load)
        except grpc.aio.AioRpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
        except asyncio.CancelledError:
            reason = "the gateway is shutting down"
            call.cancel()
            raise
        finally:
            self._lost(outbox, reason)

    def _lost(self, outbox: asyncio.Queue, reason: str) -> None:
        outbox.put_nowait(None)  # ends the request iterator
        if self._outbox is outbox:
            self._outbox = None
        self.broadcast(LinkLost(reason))
        self._log.warning("scheduler stream lost", reason=reason, requests_in_flight=self.num_in_flight)
        if self.on_lost is not None:
            self.on_lost()

    async def close(self) -> None:
        if self._dispatcher is not None and not self._dispatcher.done():
            self._dispatcher.cancel()
            try:
                await self._dispatcher
            except asyncio.CancelledError:
                pass
        await self._channel.close()


async def _messages(outbox: asyncio.Queue):
    """The request side of a Connect stream: what the handlers queue, until None."""
    while (msg := await outbox.get()) is not None:
        yield msg
