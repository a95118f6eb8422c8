"""The HTTP port's defences (http_limits.py), in process in front of test_server's fake scheduler: bodies
bounded by --max-request-bytes and parsed without trusting them (huge numbers, deep nesting) and off the
event loop; header, body and idle timeouts; the connection cap; prompts x n; clipped echoes; bearer
scheme case; and malformed requests logged as one line without a traceback."""

import asyncio
import contextlib
import json
import socket
import ssl
import time

import aiohttp
import grpc
import pytest
import structlog

import clients  # noqa: F401

# isort: split
from pagedserve.client import GenerationError, SamplingParams
from scheduler_svc.gateway.chat import CHAT_TEMPLATE_FILE
from scheduler_svc.gateway.http_limits import HugeNumber, parse_json
from scheduler_svc.gateway.http_options import HttpLimits
from scheduler_svc.gateway.openai_http import OpenAIServer
from scheduler_svc.gateway.openai_protocol import ApiError
from scheduler_svc.gateway.options import GatewayLimits, SecurityConfig
from scheduler_svc.gateway.security import bearer_matches, http_ssl_context
from tests.certs import make_ca, make_cert
from tests.factories import make_checkpoint
from tests.scheduler_svc.gateway.test_chat import CHATML
from tests.scheduler_svc.gateway.test_server import FakeScheduler, gateway_stack
from tests.waiting import wait_until_async

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "demo")
    (path / CHAT_TEMPLATE_FILE).write_text(CHATML)
    return path


@contextlib.asynccontextmanager
async def serving(model_dir, fake=None, limits=None, gateway_limits=None, token=None, ssl_context=None):
    """(base URL, port, OpenAIServer, gRPC client) of a gateway with its HTTP port on a free port."""
    fake = fake or FakeScheduler(lambda submit: [[7], [8]])

    def plain_server(gateway):
        server = grpc.aio.server()
        gateway.add_to_server(server)
        return server, f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"

    async with gateway_stack(model_dir, fake, plain_server, limits=gateway_limits) as (client, gateway, _):
        await client.wait_ready(timeout=20)
        http = OpenAIServer(gateway.core, gateway.chat, token, limits)
        port = await http.start("127.0.0.1", 0, ssl_context)
        try:
            yield f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}", port, http, client
        finally:
            await http.stop()


async def post(base: str, path: str, body=None, data: bytes | None = None, headers=None) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session, session.post(
            f"{base}{path}", json=body, data=data, headers=headers) as resp:
        return resp.status, await resp.json()


def test_parse_json_refuses_what_would_break_python():
    assert parse_json(b'{"a": 12, "b": 1.5}') == {"a": 12, "b": 1.5}
    huge = parse_json(b'{"n": ' + b"9" * 5000 + b"}")["n"]
    assert isinstance(huge, HugeNumber) and repr(huge) == "a number of 5000 digits"
    with pytest.raises(ApiError) as err:
        parse_json(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert (err.value.status, err.value.param, err.value.message) == (400, "body", "body: JSON nested too deeply")
    for raw, message in [(b"{not json", "body: is not valid JSON (Expecting property name enclosed in double quotes "
                          "at line 1 column 2)"), (b"\xff", "body: is not valid UTF-8"),
                         (b"[1, 2]", "body: must be a JSON object")]:
        with pytest.raises(ApiError) as err:
            parse_json(raw)
        assert (err.value.status, err.value.param, err.value.message) == (400, "body", message)


def test_client_mistakes_are_400_naming_the_field(model_dir):
    """Huge numbers in every kind of numeric field, deep nesting, wrong types: 400, never 500; echoed
    values clipped."""

    def number(digits: int) -> bytes:
        return b"1" + b"0" * (digits - 1)

    async def scenario():
        async with serving(model_dir) as (base, _, _, _):
            for name in ("temperature", "top_p", "max_tokens", "n", "seed", "logprobs", "top_k", "min_p",
                         "repetition_penalty", "presence_penalty"):
                for digits in (400, 5000):
                    raw = b'{"prompt": "x", "%s": %s}' % (name.encode(), number(digits))
                    status, got = await post(base, "/v1/completions", data=raw,
                                             headers={"Content-Type": "application/json"})
                    assert (status, got["error"]["param"]) == (400, name), (name, digits, got)
                    assert len(got["error"]["message"]) < 200
            deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
            status, got = await post(base, "/v1/completions", data=deep)
            assert (status, got["error"]["param"]) == (400, "body")
            nested = {"prompt": json.loads("[" * 500 + "]" * 500)}  # parses, but is no prompt
            assert (await post(base, "/v1/completions", nested))[1]["error"]["param"] == "prompt"
            status, got = await post(base, "/v1/completions", {"prompt": "x", "temperature": "h" * 100_000})
            assert (status, got["error"]["param"]) == (400, "temperature") and len(got["error"]["message"]) < 200
            status, got = await post(base, "/v1/completions", {"prompt": "x", "model": "m" * 4000})
            assert (status, got["error"]["param"]) == (404, "model") and len(got["error"]["message"]) < 300
            # A bad n is n's error, not best_of's.
            status, got = await post(base, "/v1/completions", {"prompt": "x", "best_of": 1, "n": "abc"})
            assert (status, got["error"]["param"]) == (400, "n"), got
            status, got = await post(base, "/v1/chat/completions", {
                "messages": [{"role": "r" * 4000, "content": "hi"}]})
            assert (status, got["error"]["param"]) == (400, "messages[0].role") and len(got["error"]["message"]) < 300

    asyncio.run(scenario())


def test_grpc_errors_clip_echoed_strings(model_dir):
    """A 4,000-character model name or chat role: INVALID_ARGUMENT (it was RESOURCE_EXHAUSTED, "Stream
    removed": the echo overflowed the status trailer)."""

    async def scenario():
        async with serving(model_dir) as (_, _, _, client):
            with pytest.raises(GenerationError) as err:
                await client.complete("hi", SamplingParams(max_tokens=2), model="m" * 4000)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.field == "model"
            assert len(err.value.message) < 300
            with pytest.raises(GenerationError) as err:
                await client.complete_chat([{"role": "r" * 4000, "content": "hi"}], SamplingParams(max_tokens=2))
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.field == "messages[0].role"
            assert len(err.value.message) < 300

    asyncio.run(scenario())


def test_body_limit_is_max_request_bytes(model_dir):
    async def scenario():
        async with serving(model_dir, gateway_limits=GatewayLimits(max_request_bytes=1000)) as (base, port, _, _):
            status, got = await post(base, "/v1/completions", {"prompt": "x" * 2000})
            assert status == 413 and got["error"]["param"] == "body"
            assert got["error"]["message"] == ("body: is 2014 bytes, more than the limit of 1000 bytes "
                                               "(--max-request-bytes)")

            async def chunks():  # no Content-Length: refused as it arrives
                for _ in range(10):
                    yield b" " * 500

            status, got = await post(base, "/v1/completions", data=chunks())
            assert (status, got["error"]["message"]) == (
                413, "body: is more than the limit of 1000 bytes (--max-request-bytes)")
            # 100 MB declared, 10 bytes sent: answered at once from the declared length.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n0123456789")
            head = await asyncio.wait_for(reader.readline(), 10)
            assert head.startswith(b"HTTP/1.1 413")
            writer.close()
            assert (await post(base, "/v1/completions", {"prompt": "x", "max_tokens": 2}))[0] == 200

    asyncio.run(scenario())


@pytest.mark.slow  # parses a few MB on purpose
def test_large_body_is_parsed_off_the_event_loop(model_dir):
    """Another client is answered while a large body parses: its slowest answer is a small fraction of
    the parse (on the event loop, it waited for the whole parse)."""
    body = json.dumps({"prompt": list(range(600_000)), "max_tokens": 2}).encode()
    start = time.perf_counter()
    parse_json(body)
    parse_s = time.perf_counter() - start

    async def scenario():
        async with serving(model_dir, gateway_limits=GatewayLimits(max_request_bytes=2 * len(body))) as (
                base, _, _, _):
            latencies: list[float] = []
            done = asyncio.Event()
            async with aiohttp.ClientSession() as session:
                async def probe():
                    while not done.is_set():
                        t = time.perf_counter()
                        async with session.get(f"{base}/v1/models") as resp:
                            assert resp.status == 200
                        latencies.append(time.perf_counter() - t)

                prober = asyncio.create_task(probe())
                await wait_until_async(lambda: len(latencies) >= 3, 10, what="the probe to run")
                before = len(latencies)
                status, got = await post(base, "/v1/completions", data=body)
                done.set()
                await prober
            assert status == 400 and got["error"]["param"] == "prompt"  # parsed, then refused: too long
            return latencies[before:]

    during = asyncio.run(scenario())
    assert len(during) >= 3, during  # the probe kept being answered during the large request
    assert max(during) < parse_s / 3, (max(during), parse_s)


def raw_connection(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def closed_within(sock: socket.socket, timeout_s: float) -> tuple[bool, bytes]:
    """(closed by the server within timeout_s, what it sent before)."""
    sock.settimeout(timeout_s)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except TimeoutError:
        return False, got
    except ConnectionResetError:
        pass
    return True, got


SHORT = HttpLimits(http_header_timeout=0.3, http_body_timeout=0.3, http_idle_timeout=2.0, max_http_connections=3)


@pytest.mark.slow  # waits for the timeouts
def test_header_body_and_idle_timeouts(model_dir):
    async def scenario():
        async with serving(model_dir, limits=SHORT) as (_, port, http, _):
            def checks():
                silent = raw_connection(port)  # connects, sends nothing
                slow = raw_connection(port)  # slowloris: a header byte every 0.1 s, never the end
                slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
                start = time.monotonic()
                closed = False
                while time.monotonic() - start < 5 and not closed:
                    try:
                        slow.sendall(b"X")
                    except (BrokenPipeError, ConnectionResetError):
                        closed = True
                    time.sleep(0.1)
                    closed = closed or closed_within(slow, 0.01)[0]
                assert closed and time.monotonic() - start < 5
                assert closed_within(silent, 5)[0]

                body = raw_connection(port)  # declares 1000 bytes, sends 10
                body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 1000\r\n\r\n0123456789")
                closed, got = closed_within(body, 5)
                assert got.startswith(b"HTTP/1.1 408") and b"--http-body-timeout" in got and closed

                idle = raw_connection(port)  # one request, then silence: open until the idle timeout
                idle.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
                assert idle.recv(65536).startswith(b"HTTP/1.1 200")
                assert closed_within(idle, 1.0) == (False, b"")  # idle (2 s), not the header timeout (0.3 s)
                assert closed_within(idle, 5)[0]
                for sock in (silent, slow, body, idle):
                    sock.close()

            await asyncio.to_thread(checks)
            assert http.guard.closed_by_timeout >= 3

    asyncio.run(scenario())


def test_tls_connections_are_guarded_too(model_dir, tmp_path):
    """Over TLS: requests are answered, and a connection that completes its handshake and then sends
    nothing is closed at the header timeout."""
    ca = make_ca(tmp_path / "ca")
    server = make_cert(tmp_path / "server", ca, "server")
    context = http_ssl_context(SecurityConfig(tls_cert=str(server.cert), tls_key=str(server.key)))
    client_context = ssl.create_default_context(cafile=str(ca.cert))

    async def scenario():
        async with serving(model_dir, limits=SHORT, ssl_context=context) as (base, port, http, _):
            async with aiohttp.ClientSession() as session, session.get(f"{base}/v1/models", ssl=client_context) as r:
                assert r.status == 200

            def silent():
                with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                        client_context.wrap_socket(raw, server_hostname="localhost") as sock:
                    start = time.monotonic()
                    try:
                        assert sock.recv(1) == b""  # closed by the server
                    except (ssl.SSLError, ConnectionResetError):
                        pass  # closed less politely
                    return time.monotonic() - start

            assert await asyncio.to_thread(silent) < 5
            assert http.guard.closed_by_timeout >= 1

    asyncio.run(scenario())


def test_connection_cap(model_dir):
    limits = HttpLimits(max_http_connections=3, http_idle_timeout=30.0)

    async def scenario():
        async with serving(model_dir, limits=limits) as (_, port, http, _):
            def fill():
                held = []
                for _ in range(3):
                    sock = raw_connection(port)
                    sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
                    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
                    held.append(sock)
                with raw_connection(port) as refused:
                    closed, got = closed_within(refused, 5)
                assert closed and got.startswith(b"HTTP/1.1 503") and b"too many open connections" in got
                return held

            held = await asyncio.to_thread(fill)
            assert (http.guard.num_open, http.guard.refused) == (3, 1)
            held.pop().close()
            await wait_until_async(lambda: http.guard.num_open == 2, 10, what="the closed connection to count")

            def one_more():
                sock = raw_connection(port)
                sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
                assert sock.recv(65536).startswith(b"HTTP/1.1 200")
                sock.close()

            await asyncio.to_thread(one_more)
            for sock in held:
                sock.close()

    asyncio.run(scenario())


def test_prompts_times_n_is_capped_and_prompts_take_turns(model_dir):
    fake = FakeScheduler(lambda submit: [[7]] * 5)
    fake.step_s = 0.01
    limits = HttpLimits(max_sequences_per_request=16, sequences_in_flight_per_request=2)

    async def scenario():
        async with serving(model_dir, fake, limits) as (base, _, http, _):
            status, got = await post(base, "/v1/completions", {"prompt": ["a"] * 9, "n": 2, "best_of": 2})
            assert (status, got["error"]["param"]) == (400, "prompt")
            assert got["error"]["message"] == ("prompt: 9 prompt(s) x n=2 is 18 sequences; the limit is 16 per "
                                               "request (--max-sequences-per-request)")
            async with serving(model_dir, fake, HttpLimits(max_sequences_per_request=8)) as (other, _, _, _):
                status, got = await post(other, "/v1/completions", {"prompt": "a", "n": 9})
                assert (status, got["error"]["param"]) == (400, "n")
            # Six prompts, two sequences at a time: never more than two of them run together.
            most = 0

            async def watch():
                nonlocal most
                while True:
                    most = max(most, http.core.num_active)
                    await asyncio.sleep(0.002)

            watcher = asyncio.create_task(watch())
            status, got = await post(base, "/v1/completions", {"prompt": ["a", "b", "c", "d", "e", "f"],
                                                               "max_tokens": 5})
            watcher.cancel()
            assert status == 200 and len(got["choices"]) == 6
            assert most == 2

    asyncio.run(scenario())


def test_bearer_scheme_is_case_insensitive(model_dir):
    assert bearer_matches("Bearer s3cret", b"s3cret") and bearer_matches(b"bearer s3cret", b"s3cret")
    assert bearer_matches("BEARER  s3cret ", b"s3cret")
    assert not bearer_matches("Basic s3cret", b"s3cret") and not bearer_matches("Bearer s3cre", b"s3cret")
    assert not bearer_matches("Bearers3cret", b"s3cret")

    async def scenario():
        async with serving(model_dir, token=TOKEN) as (base, _, _, _):
            for header, status in [(f"bearer {TOKEN}", 200), (f"BEARER {TOKEN}", 200), (f"Basic {TOKEN}", 401),
                                   ("bearer nope", 401)]:
                got = await post(base, "/v1/completions", {"prompt": "x", "max_tokens": 2},
                                 headers={"Authorization": header})
                assert got[0] == status, (header, got)

    asyncio.run(scenario())


def test_malformed_requests_log_one_line_without_a_traceback(model_dir, capfd):
    async def scenario():
        async with serving(model_dir) as (_, port, _, _):
            def send(raw: bytes) -> bytes:
                with raw_connection(port) as sock:
                    sock.sendall(raw)
                    return closed_within(sock, 5)[1]

            with structlog.testing.capture_logs() as events:
                for _ in range(5):
                    got = await asyncio.to_thread(send, b"GET /v1/models HTTP/1.1\r\nBad Header\r\n\r\n")
                    assert got.split(b" ")[1] == b"400", got
                await asyncio.to_thread(send, b"\x16\x03\x01 not http at all\r\n\r\n")
            return events

    events = asyncio.run(scenario())
    malformed = [e for e in events if e["event"] == "malformed http request"]
    assert len(malformed) == 1 and "exc_info" not in malformed[0] and "exception" not in malformed[0]
    assert "Traceback" not in capfd.readouterr().err
