"""What keeps one HTTP client from hurting the others (see http_options.py for the settings).

- Connections (ConnectionGuard, GuardedSite): at most ``max_http_connections`` open per gateway process
  (one more is answered 503 and closed); a connection must complete a request's head within
  ``http_header_timeout`` of its first byte (or of connecting) and is closed after ``http_idle_timeout``
  without a request. aiohttp has neither a header deadline nor a connection cap, so every connection's
  protocol is wrapped; a middleware tells the wrapper when a request starts and ends.
- Bodies (read_json): at most ``--max-request-bytes`` (413 naming the limit, at once when the declared
  Content-Length says so), whole within ``http_body_timeout`` (408). Parsed without trusting the
  client: a number of more than MAX_NUMBER_DIGITS digits stays a HugeNumber that the field checks refuse
  by name, JSON nested deeper than Python recurses is a 400, and a large body is parsed in a thread with
  Python hooks on its numbers, which hand the interpreter back to the event loop every few
  milliseconds, so that other clients (HTTP and gRPC, one loop) keep being served meanwhile.
- Logs: a malformed request (bad request line, bad headers) is a client's mistake, not a server error:
  one structured line at most every CLIENT_ERROR_LOG_INTERVAL_S, never a traceback (aiohttp logs one
  per request otherwise, before authentication).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from gpu_worker import log
from scheduler_svc.gateway.http_options import HttpLimits
from scheduler_svc.gateway.openai_protocol import ApiError

MAX_NUMBER_DIGITS = 64  # more digits than any field's range needs (uint64 has 20)
INLINE_PARSE_BYTES = 64 * 2**10  # smaller bodies parse on the event loop: a thread would cost more
CLIENT_ERROR_LOG_INTERVAL_S = 10.0


class HugeNumber:
    """A JSON number with more than MAX_NUMBER_DIGITS digits: kept as its length, never converted (Python
    refuses ints of over 4,300 digits, and turning a long one into a float overflows)."""

    __slots__ = ("digits",)

    def __init__(self, text: str) -> None:
        self.digits = sum(c.isdigit() for c in text)

    def __repr__(self) -> str:
        return f"a number of {self.digits} digits"


def _int(text: str) -> int | HugeNumber:
    return int(text) if len(text) <= MAX_NUMBER_DIGITS else HugeNumber(text)


def _float(text: str) -> float:
    return float(text)  # a Python frame: the parse yields the interpreter here (see the module's docstring)


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object, or ApiError(400) naming ``body``."""
    try:
        body = json.loads(raw.decode("utf-8"), parse_int=_int, parse_float=_float)
    except UnicodeDecodeError:
        raise ApiError(400, "body: is not valid UTF-8", "body", "invalid_json") from None
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"body: is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
                       "body", "invalid_json") from None
    except RecursionError:
        raise ApiError(400, "body: JSON nested too deeply", "body", "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "body: must be a JSON object", "body", "invalid_json")
    return body


# A request whose connection closes after its response (aiohttp 3.13+ wants typed keys; 3.9 has none).
_CLOSE = web.RequestKey("close_connection", bool) if hasattr(web, "RequestKey") else "close_connection"
_PARSER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="http-json")  # one large body at a time


async def read_json(request: web.Request, max_bytes: int, timeout_s: float) -> dict:
    """The request's JSON object body, bounded in size and time (see the module's docstring)."""
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        raise too_large(max_bytes, declared)
    try:
        async with asyncio.timeout(timeout_s):
            raw = await request.read()
    except TimeoutError:
        request[_CLOSE] = True  # what is left of the body will not be read
        raise ApiError(408, f"body: not received within {timeout_s:g} s (--http-body-timeout)", "body",
                       "request_timeout") from None
    except web.HTTPRequestEntityTooLarge:
        raise too_large(max_bytes, None) from None
    if len(raw) <= INLINE_PARSE_BYTES:
        return parse_json(raw)
    return await asyncio.get_running_loop().run_in_executor(_PARSER, parse_json, raw)


def too_large(max_bytes: int, size: int | None) -> ApiError:
    what = f"is {size} bytes, more than" if size is not None else "is more than"
    return ApiError(413, f"body: {what} the limit of {max_bytes} bytes (--max-request-bytes)", "body",
                    "request_too_large")


def check_sequences(num_prompts: int, n: int, limits: HttpLimits) -> None:
    """prompts x n of one request against --max-sequences-per-request (400 naming prompt, or n alone)."""
    cap = limits.max_sequences_per_request
    if num_prompts * n > cap:
        field = "prompt" if num_prompts > 1 else "n"
        raise ApiError.invalid(field, f"{num_prompts} prompt(s) x n={n} is {num_prompts * n} sequences; the limit "
                               f"is {cap} per request (--max-sequences-per-request)")


def check_prompt_count(prompt, max_model_len: int, limits: HttpLimits) -> None:
    """A ``prompt`` list too long to be either one prompt (token ids within the context) or a list of
    prompts (within --max-sequences-per-request) is refused by its length alone, before the checks that
    look at each item: those run on the event loop, and a 4 MiB body holds 700,000 numbers."""
    bound = max(max_model_len, limits.max_sequences_per_request)
    if isinstance(prompt, list) and len(prompt) > bound:
        raise ApiError.invalid("prompt", f"a list of {len(prompt)} items is longer than a prompt of the context "
                               f"length ({max_model_len} tokens) and than --max-sequences-per-request "
                               f"({limits.max_sequences_per_request} prompts)")


# ---- connections


_BUSY_BODY = json.dumps({"error": {"message": "too many open connections; retry later", "type": "server_error",
                                   "param": None, "code": "unavailable"}}).encode()
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
         b"Retry-After: 1\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class _GuardedProtocol(asyncio.Protocol):
    """aiohttp's protocol for one connection, behind the connection cap and the head and idle deadlines."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard, self._inner = guard, inner
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._waiting_head = True  # False: idle between requests (no byte of the next one yet)
        self._requests = 0  # in progress
        self._admitted = False

    def connection_made(self, transport) -> None:
        self._transport = transport
        if not self._guard.admit(transport, self):
            transport.write(_BUSY)
            transport.close()
            return
        self._admitted = True
        self._arm(self._guard.limits.http_header_timeout)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return
        if self._requests == 0 and not self._waiting_head:  # the next request's first byte
            self._waiting_head = True
            self._arm(self._guard.limits.http_header_timeout)
        self._inner.data_received(data)

    def eof_received(self):
        return self._inner.eof_received() if self._admitted else None

    def connection_lost(self, exc) -> None:
        self._cancel()
        if self._admitted:
            self._guard.release(self._transport)
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def request_started(self) -> None:
        self._requests += 1
        self._cancel()

    def request_finished(self) -> None:
        self._requests -= 1
        if self._requests == 0:
            self._waiting_head = False
            self._arm(self._guard.limits.http_idle_timeout)

    def _arm(self, delay_s: float) -> None:
        self._cancel()
        self._timer = asyncio.get_running_loop().call_later(delay_s, self._expire)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self._requests == 0 and self._transport is not None:
            self._guard.closed_by_timeout += 1
            self._transport.close()


class ConnectionGuard:
    """The open connections of one HTTP server, counted and watched."""

    def __init__(self, limits: HttpLimits) -> None:
        self.limits = limits
        self._open: dict[object, _GuardedProtocol] = {}  # by transport (what a request knows)
        self.refused = 0
        self.closed_by_timeout = 0

    @property
    def num_open(self) -> int:
        return len(self._open)

    def protocol(self, inner: asyncio.Protocol) -> _GuardedProtocol:
        return _GuardedProtocol(self, inner)

    def admit(self, transport, protocol: _GuardedProtocol) -> bool:
        if len(self._open) >= self.limits.max_http_connections:
            self.refused += 1
            return False
        self._open[transport] = protocol
        return True

    def release(self, transport) -> None:
        self._open.pop(transport, None)

    def middleware(self):
        """The outermost middleware: a request holds its connection open, whatever it takes."""

        @web.middleware
        async def track(request: web.Request, handler) -> web.StreamResponse:
            conn = self._open.get(request.transport)
            if conn is not None:
                conn.request_started()
            try:
                response = await handler(request)
                if request.get(_CLOSE):
                    response.force_close()
                return response
            finally:
                if conn is not None:
                    conn.request_finished()

        return track


class GuardedSite(web.BaseSite):
    """aiohttp's TCPSite with every connection's protocol wrapped by a ConnectionGuard."""

    __slots__ = ("_host", "_port", "_reuse_port", "_guard")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard, ssl_context=None,
                 reuse_port: bool = False) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._host, self._port, self._reuse_port, self._guard = host, port, reuse_port, guard

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        make = self._runner.server
        tls_timeout = self._guard.limits.http_header_timeout if self._ssl_context else None
        self._server = await asyncio.get_running_loop().create_server(
            lambda: self._guard.protocol(make()), self._host, self._port, ssl=self._ssl_context,
            reuse_port=self._reuse_port or None, ssl_handshake_timeout=tls_timeout)


# ---- logs


class _ClientErrorHandler(logging.Handler):
    """aiohttp's "Error handling request" records as one structured line, without the traceback, at most
    every CLIENT_ERROR_LOG_INTERVAL_S (the lines in between are counted in the next one)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)  # aiohttp logs what is routine (non-HTTP bytes) at debug
        self._last = -CLIENT_ERROR_LOG_INTERVAL_S
        self._skipped = 0

    def emit(self, record: logging.LogRecord) -> None:
        now = time.monotonic()
        if now - self._last < CLIENT_ERROR_LOG_INTERVAL_S:
            self._skipped += 1
            return
        self._last = now
        exc = record.exc_info[1] if record.exc_info else None
        detail = f"{type(exc).__name__}: {str(exc)[:200]}" if exc is not None else record.getMessage()[:200]
        log.get_logger().warning("malformed http request", error=detail, not_logged_since_last=self._skipped)
        self._skipped = 0


def client_error_logger() -> logging.Logger:
    """The logger to give aiohttp's server (its ``logger`` setting)."""
    logger = logging.getLogger("pagedserve.http.client_errors")
    if not logger.handlers:
        logger.addHandler(_ClientErrorHandler())
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
    return logger
