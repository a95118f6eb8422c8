"""The gateway's end of the gateway<->scheduler link: one Connect stream multiplexing every request.

A request handler calls ``submit`` and takes its request's outputs from the ``RequestInbox`` it gets
back. The scheduler sends one event per engine step; a reader thread takes each event off the stream
as soon as it arrives and hands it to the event loop, where ``_drain`` routes the event's outputs to
their requests' inboxes. When the stream ends, every registered inbox receives a ``LinkLost`` and the
link is down until ``connect`` is called again (the gateway's watcher does so when the scheduler
reports ready).

Why a thread: read on the event loop, the stream yields one event per pass of the loop, and a pass
runs every handler that has something to write (one gRPC write each, ~30 us of CPU). When the
gateway is slower than the engine, that lock-step sends one token per response while the engine's
events back up in the scheduler without bound. Read by a thread (the gRPC wait releases the GIL),
every event that has arrived is routed at the start of the next pass, so each handler finds all the
steps since its last write and sends them as one response: a gateway under load coalesces instead of
falling behind, and its clients still see every step's tokens about one pass after the engine made
them. A request is woken once per pass at most, however many steps arrived for it.

Everything but ``_read`` runs on the gateway's event loop; the reader thread only appends to a deque
and schedules ``_drain`` (the GIL makes those two steps safe without a lock).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import grpc

import clients  # noqa: F401
from gpu_worker import log
from pagedserve.internal.v1 import scheduler_pb2, scheduler_pb2_grpc
from scheduler_svc.gateway.options import DEFAULT_KEEPALIVE_S, MIN_KEEPALIVE_S


def channel_options(keepalive_s: float = DEFAULT_KEEPALIVE_S) -> list[tuple[str, int]]:
    """The link's channel: a keepalive ping every ``keepalive_s`` on the open Connect stream notices a
    scheduler whose host vanished without closing it; an idle stream (no request running, no data
    either way) pings too. The scheduler must permit pings that often without data, or it answers
    with GOAWAY too_many_pings and the stream drops (grpcio's default minimum is 5 minutes)."""
    if keepalive_s < MIN_KEEPALIVE_S:
        raise ValueError(f"the scheduler keepalive must be at least {MIN_KEEPALIVE_S:g} s, got {keepalive_s:g}")
    return [
        ("grpc.max_receive_message_length", 64 * 2**20),
        ("grpc.max_send_message_length", 64 * 2**20),
        ("grpc.keepalive_time_ms", round(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),  # also while no request is running
    ]


CHANNEL_OPTIONS = channel_options()


@dataclass(frozen=True, slots=True)
class LinkLost:
    """Queued to every request in flight when the Connect stream ends."""

    reason: str


class LinkDown(RuntimeError):
    """No Connect stream is open."""


class DuplicateRequest(ValueError):
    """A request with this id is already in flight on this gateway."""


class RequestInbox:
    """One request's outputs not yet taken: the subset of asyncio.Queue's interface the gateway uses,
    without its bookkeeping (no task counting, no size bound, one waiter)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque = deque()
        self._waiter: asyncio.Future | None = None

    def put_nowait(self, item: object) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def get_nowait(self) -> object:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.popleft()

    async def get(self) -> object:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


class SchedulerLink:
    def __init__(self, address: str, on_lost: Callable[[], None] | None = None,
                 on_load: Callable[[scheduler_pb2.EngineLoad], None] | None = None,
                 keepalive_s: float = DEFAULT_KEEPALIVE_S) -> None:
        self.address = address
        self.on_lost = on_lost
        self.on_load = on_load  # the engine's load reports, as they arrive on the stream
        self._options = channel_options(keepalive_s)
        self._channel = grpc.aio.insecure_channel(address, options=self._options)  # GetEngineInfo
        self._stub = scheduler_pb2_grpc.SchedulerServiceStub(self._channel)
        self._stream_channel: grpc.Channel | None = None  # the Connect stream's (read by a thread)
        self._routes: dict[str, RequestInbox] = {}
        self._up: queue.Queue | None = None  # GatewayMessages up the open stream; None when down
        self._call = None
        self._reader: threading.Thread | None = None
        self._arrived: deque = deque()  # events read, not yet routed
        self._drain_scheduled = False
        self._closing = False
        self._log = log.get_logger(scheduler=address)

    @property
    def connected(self) -> bool:
        return self._up is not None

    @property
    def num_in_flight(self) -> int:
        return len(self._routes)

    async def engine_info(self, timeout_s: float = 2.0) -> scheduler_pb2.EngineInfo:
        return await self._stub.GetEngineInfo(scheduler_pb2.GetEngineInfoRequest(), timeout=timeout_s)

    def connect(self) -> None:
        """Opens the Connect stream; a refusal or a later break shows up as LinkLost in the inboxes."""
        if self.connected or self._closing:
            return
        if self._stream_channel is None:
            self._stream_channel = grpc.insecure_channel(self.address, options=self._options)
        up: queue.Queue = queue.Queue()
        self._call = scheduler_pb2_grpc.SchedulerServiceStub(self._stream_channel).Connect(iter(up.get, None))
        self._up = up
        self._reader = threading.Thread(target=self._read, args=(self._call, up, asyncio.get_running_loop()),
                                        name="scheduler-reader", daemon=True)
        self._reader.start()
        self._log.info("scheduler stream opened")

    # ---- requests

    def submit(self, request_id: str, prompt_token_ids: list[int], params: scheduler_pb2.SamplingParams):
        """Sends a Submit; returns the inbox that receives the request's RequestOutputs (or LinkLost)."""
        if self._up is None:
            raise LinkDown("not connected to the scheduler")
        if request_id in self._routes:
            raise DuplicateRequest(request_id)
        inbox = RequestInbox()
        self._routes[request_id] = inbox
        self._up.put(scheduler_pb2.GatewayMessage(submit=scheduler_pb2.Submit(
            request_id=request_id, prompt_token_ids=prompt_token_ids, sampling_params=params,
        )))
        return inbox

    def release(self, request_id: str, abort: bool) -> None:
        """Forgets a request; with ``abort`` the scheduler ends it and frees its blocks within a step.

        Synchronous on purpose: it runs in ``finally`` blocks of cancelled handlers."""
        self._routes.pop(request_id, None)
        if abort and self._up is not None:
            self._up.put(scheduler_pb2.GatewayMessage(abort=scheduler_pb2.Abort(request_id=request_id)))

    def broadcast(self, item: object) -> None:
        """Queues ``item`` to every request in flight (used to end them at shutdown)."""
        for inbox in list(self._routes.values()):
            inbox.put_nowait(item)

    # ---- the stream

    def _read(self, call, up: queue.Queue, loop: asyncio.AbstractEventLoop) -> None:
        """The reader thread: every event to the loop as it arrives, then the end of the stream."""
        reason = "the scheduler ended the stream"
        try:
            for event in call:
                self._arrived.append(event)
                if not self._drain_scheduled:
                    self._drain_scheduled = True
                    loop.call_soon_threadsafe(self._drain)
        except grpc.RpcError as exc:
            reason = ("the gateway is shutting down" if self._closing
                      else f"{exc.code().name}: {exc.details()}")
        try:
            loop.call_soon_threadsafe(self._lost, up, reason)  # after the last _drain: callbacks run in order
        except RuntimeError:
            pass  # the loop is closed: nobody is left to tell

    def _drain(self) -> None:
        """Routes every event read so far (in order) to the requests' inboxes."""
        self._drain_scheduled = False  # first: an event appended from now on schedules another drain
        arrived, routes = self._arrived, self._routes
        while arrived:
            event = arrived.popleft()
            for out in event.outputs:
                inbox = routes.get(out.request_id)
                if inbox is not None:  # else: released already (cancelled, or stopped here)
                    inbox.put_nowait(out)
            if self.on_load is not None and event.HasField("load"):
                self.on_load(event.load)

    def _lost(self, up: queue.Queue, reason: str) -> None:
        up.put(None)  # ends the request iterator
        if self._up is not up:
            return
        self._up = None
        self.broadcast(LinkLost(reason))
        self._log.warning("scheduler stream lost", reason=reason, requests_in_flight=self.num_in_flight)
        if self.on_lost is not None:
            self.on_lost()

    async def close(self) -> None:
        self._closing = True
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join, 10)
        if self._stream_channel is not None:
            self._stream_channel.close()
        await self._channel.close()
