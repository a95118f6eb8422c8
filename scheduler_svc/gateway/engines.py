"""The gateway's engines: one SchedulerLink each, how they are found, and the router that picks one
engine per request.

Discovery. ``--scheduler`` is a comma-separated list of addresses (host:port, unix:PATH), or
``dns:NAME:PORT``: a name resolved at start and every ``dns_refresh_s`` seconds. In Kubernetes that is the
engines' headless Service, whose name resolves to the engine pods that are ready. An address that leaves
the answer is retired: it gets no new requests and its link closes once its requests are done; if it
comes back it is used again. A failed lookup keeps the engines as they are.

Each engine has a watcher task: it polls GetEngineInfo until the engine is ready, opens the Connect
stream, and polls again at once when the stream is lost. A lost stream ends that engine's requests with
UNAVAILABLE (their queues get LinkLost) and the other engines carry on; the pool is ready while at least
one engine is. Once the engine answers again it gets requests again.

Everything here runs on the gateway's event loop; no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

import clients  # noqa: F401
from gpu_worker import log
from pagedserve.internal.v1 import scheduler_pb2
from scheduler_svc.gateway.metrics import GatewayMetrics
from scheduler_svc.gateway.options import DEFAULT_KEEPALIVE_S
from scheduler_svc.gateway.router import Router
from scheduler_svc.gateway.scheduler_link import DuplicateRequest, LinkDown, SchedulerLink

POLL_READY_S = 2.0  # GetEngineInfo period of a ready engine (the stream reports trouble sooner)
POLL_NOT_READY_S = 0.25


@dataclass(eq=False)
class Engine:
    """One engine as this gateway sees it."""

    address: str
    link: SchedulerLink
    info: scheduler_pb2.EngineInfo | None = None  # the last GetEngineInfo answer
    load: scheduler_pb2.EngineLoad | None = None  # the last load reported on the stream
    in_flight_at_load: int = 0  # this gateway's requests in flight there when that report arrived
    retired: bool = False  # left the DNS answer: no new requests
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    watcher: asyncio.Task | None = None

    @property
    def name(self) -> str:
        """The engine's own name once it answered (its metrics' engine label), else the address."""
        return self.info.engine_name if self.info is not None and self.info.engine_name else self.address

    @property
    def ready(self) -> bool:
        return self.info is not None and self.info.ready and self.link.connected and not self.retired

    @property
    def num_requests(self) -> int:
        """Requests running or waiting there, as far as this gateway knows: the last report, corrected by
        what this gateway sent there and saw end since (a report taken during a burst would otherwise hold
        an engine that went idle as busy until the next one), never fewer than this gateway's own
        requests in flight there."""
        load = self.load
        reported = load.num_requests_running + load.num_requests_waiting if load is not None else 0
        in_flight = self.link.num_in_flight
        return max(reported + in_flight - self.in_flight_at_load, in_flight)

    @property
    def num_free_blocks(self) -> int | None:
        return self.load.num_free_blocks if self.load is not None else None

    def on_load(self, load: scheduler_pb2.EngineLoad) -> None:
        self.load = load
        self.in_flight_at_load = self.link.num_in_flight


def parse_engines(spec: str) -> tuple[list[str], tuple[str, int] | None]:
    """``ADDR[,ADDR...]`` -> (addresses, None); ``dns:NAME:PORT`` (or dns:///NAME:PORT) -> ([], (NAME, PORT))."""
    spec = spec.strip()
    if spec.startswith("dns:"):
        host, sep, port = spec.removeprefix("dns:").lstrip("/").rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"--scheduler {spec!r}: expected dns:NAME:PORT")
        return [], (host, int(port))
    addresses = [a.strip() for a in spec.split(",") if a.strip()]
    if not addresses:
        raise ValueError("--scheduler: no address given")
    if len(set(addresses)) != len(addresses):
        raise ValueError(f"--scheduler {spec!r}: an address appears twice")
    return addresses, None


def format_address(host: str, port: int) -> str:
    """HOST:PORT, an IPv6 host in brackets (once)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class EnginePool:
    """The engines behind this gateway, with SchedulerLink's request surface (submit, release, broadcast)
    so that GenerationCore need not know there are several."""

    def __init__(self, spec: str, router: Router, metrics: GatewayMetrics,
                 on_change: Callable[[], None] | None = None, dns_refresh_s: float = 5.0,
                 keepalive_s: float = DEFAULT_KEEPALIVE_S) -> None:
        self.addresses, self.dns = parse_engines(spec)
        self.keepalive_s = keepalive_s  # of each engine's link
        self.router = router
        self.metrics = metrics
        self.on_change = on_change
        self.dns_refresh_s = dns_refresh_s
        self.engines: dict[str, Engine] = {}  # by address
        self._routes: dict[str, Engine] = {}  # request_id -> the engine serving it
        self._resolver: asyncio.Task | None = None
        self._closed = False
        self._log = log.get_logger()

    # ---- lifetime

    async def start(self) -> None:
        if self.dns is None:
            self._update(self.addresses)
        else:
            self._resolver = asyncio.create_task(self._resolve_forever(), name="engine-resolver")

    async def close(self) -> None:
        self._closed = True
        tasks = [t for t in (self._resolver, *(e.watcher for e in self.engines.values())) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for engine in self.engines.values():
            await engine.link.close()

    # ---- the request surface

    @property
    def ready_engines(self) -> list[Engine]:
        return [e for e in self.engines.values() if e.ready]

    @property
    def connected(self) -> bool:
        """Whether any engine takes requests."""
        return any(e.ready for e in self.engines.values())

    @property
    def info(self) -> scheduler_pb2.EngineInfo | None:
        """The model as a ready engine describes it (engines serve the same model); None if none is ready."""
        ready = sorted(self.ready_engines, key=lambda e: e.name)
        return ready[0].info if ready else None

    def submit(self, request_id: str, prompt_token_ids: list[int], params: scheduler_pb2.SamplingParams):
        """Routes the request and sends it; returns the queue of its RequestOutputs (or LinkLost)."""
        if request_id in self._routes:
            raise DuplicateRequest(request_id)
        ready = self.ready_engines
        if not ready:
            raise LinkDown("no engine is ready")
        engine, reason = self.router.choose(ready, prompt_token_ids, ready[0].info.block_size)
        queue = engine.link.submit(request_id, prompt_token_ids, params)
        self._routes[request_id] = engine
        self.metrics.routed(engine.name, reason)
        return queue

    def release(self, request_id: str, abort: bool) -> str:
        """Forgets a request (aborting it upstream with ``abort``); returns its engine's name."""
        engine = self._routes.pop(request_id, None)
        if engine is None:
            return ""
        engine.link.release(request_id, abort)
        if engine.retired and not engine.link.num_in_flight:
            self._drop(engine)
        return engine.name

    def broadcast(self, item: object) -> None:
        for engine in self.engines.values():
            engine.link.broadcast(item)

    # ---- discovery and watching

    def _update(self, addresses: list[str]) -> None:
        """Makes ``addresses`` the engines: new ones get a watcher, missing ones retire."""
        for address in addresses:
            engine = self.engines.get(address)
            if engine is None:
                engine = Engine(address, SchedulerLink(address, keepalive_s=self.keepalive_s))
                engine.link.on_lost = engine.wake.set
                engine.link.on_load = engine.on_load
                engine.watcher = asyncio.create_task(self._watch(engine), name=f"engine-watcher {address}")
                self.engines[address] = engine
                self._log.info("engine added", address=address)
            elif engine.retired:
                engine.retired = False
                self._log.info("engine back", engine=engine.name, address=address)
            self._changed(engine)
        for engine in list(self.engines.values()):
            if engine.address not in addresses and not engine.retired:
                engine.retired = True
                self._log.info("engine retired", engine=engine.name, requests_in_flight=engine.link.num_in_flight)
                self._changed(engine)
                if not engine.link.num_in_flight:
                    self._drop(engine)

    def _drop(self, engine: Engine) -> None:
        """Stops watching a retired engine with nothing in flight and closes its link."""
        if self.engines.get(engine.address) is not engine:
            return
        del self.engines[engine.address]
        if engine.watcher is not None:
            engine.watcher.cancel()
        asyncio.get_running_loop().create_task(engine.link.close())
        if engine.info is not None:
            self.metrics.engine_ready(engine.name, False)

    async def _resolve_forever(self) -> None:
        host, port = self.dns
        loop = asyncio.get_running_loop()
        while not self._closed:
            try:
                answer = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                self._update(sorted({format_address(a[4][0], port) for a in answer}))
            except OSError as exc:  # socket.gaierror: no such name (no engine is ready), or DNS trouble
                self._log.warning("engine lookup failed; keeping the engines", name=host, error=str(exc))
            await asyncio.sleep(self.dns_refresh_s)

    async def _watch(self, engine: Engine) -> None:
        """Polls GetEngineInfo; (re)opens the stream when the engine is ready."""
        while not self._closed:
            try:
                info = await engine.link.engine_info()
            except grpc.aio.AioRpcError:
                info = None
            was_ready = engine.ready
            engine.info = info if info is not None else engine.info
            if info is not None and info.ready:
                engine.link.connect()
            elif engine.info is not None:
                engine.info.ready = False
            if engine.ready != was_ready:
                self._log.info("engine ready" if engine.ready else "engine not ready", engine=engine.name,
                               address=engine.address)
            self._changed(engine)
            engine.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(engine.wake.wait(), POLL_READY_S if engine.ready else POLL_NOT_READY_S)

    def _changed(self, engine: Engine) -> None:
        if engine.info is not None:  # named: the address is only a stand-in
            self.metrics.engine_ready(engine.name, engine.ready)
        if self.on_change is not None:
            self.on_change()
