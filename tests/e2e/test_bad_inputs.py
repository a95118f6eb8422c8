"""Every bad input of docs/ERRORS.md against a running `pagedserve serve`, from the tables in
tests/e2e/bad_inputs.py (gRPC) and tests/e2e/bad_http_inputs.py (the OpenAI-compatible HTTP port): the
status code, the message and the field named, then the service goes on with every block free. The
document holds exactly those tables (a fast test); no client mistake is a 500, UNKNOWN or INTERNAL."""

import json
import socket
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import clients  # noqa: F401

# isort: split
from pagedserve.client import Client, GenerationError, SamplingParams
from pagedserve.v1 import generation_pb2
from scheduler_svc.bench.local_service import LocalService
from scheduler_svc.gateway.chat import CHAT_TEMPLATE_FILE
from tests.e2e import bad_inputs
from tests.e2e.bad_http_inputs import HTTP_CASES
from tests.e2e.bad_inputs import CASES, CONTEXT_LEN, MODEL, Case
from tests.factories import make_checkpoint
from tests.scheduler_svc.gateway.test_chat import CHATML
from tests.waiting import wait_until

ERRORS_MD = Path(__file__).resolve().parents[2] / "docs" / "ERRORS.md"
TOKEN = "table-token"
LONG = SamplingParams(max_tokens=1000, ignore_eos=True)  # prompt + 1000 tokens fit the 1024-token pool


def test_errors_md_holds_the_tables():
    text = ERRORS_MD.read_text()
    assert bad_inputs.render_table() in text and bad_inputs.render_table(HTTP_CASES) in text
    assert len(CASES) >= 40 and len(HTTP_CASES) >= 60 and len(CASES) + len(HTTP_CASES) >= 120
    # A client's mistake is never the server's error.
    assert not [c.name for c in CASES if c.code in ("UNKNOWN", "INTERNAL")]
    assert not [c.name for c in HTTP_CASES if c.code.startswith("5")]


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-inputs")
    model = make_checkpoint(tmp / MODEL, max_position_embeddings=CONTEXT_LEN)
    (model / CHAT_TEMPLATE_FILE).write_text(CHATML)
    (tmp / "token").write_text(TOKEN)
    plain = LocalService(model, *bad_inputs.SERVICE_FLAGS, log_dir=tmp / "plain")
    try:
        token = LocalService(model, *bad_inputs.TOKEN_FLAGS, "--auth-token-file", str(tmp / "token"),
                             log_dir=tmp / "token-logs")
    except BaseException:
        plain.stop()
        raise
    # The pool (1024 tokens) is shorter than the model's context (2048): the scheduler serves what it holds.
    assert ("the KV pool holds 1024 tokens, fewer than the model's context of 2048: serving max_model_len 1024"
            in (tmp / "plain" / "scheduler.log").read_text())
    yield {"plain": plain, "token": token}
    codes = {name: svc.stop() for name, svc in (("plain", plain), ("token", token))}
    assert codes == {"plain": 0, "token": 0}


def _metadata(case: Case):
    return {"wrong_token": (("authorization", "Bearer nope"),), "no_token": (),
            "basic_scheme": (("authorization", f"Basic {TOKEN}"),),
            "lower_bearer": (("authorization", f"bearer {TOKEN}"),)}.get(
        case.setup, (("authorization", f"Bearer {TOKEN}"),))


def call(target: str, case: Case) -> tuple[str, str, str | None]:
    """(status code, message, field) of one call."""
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", -1)]) as channel:
        try:
            if case.rpc == "Health":
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(**case.request),
                                                                  timeout=30, metadata=_metadata(case))
                return "OK", health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status), None
            if case.rpc == "Tokenize":
                method = channel.unary_unary("/pagedserve.v1.GenerationService/Tokenize",
                                             response_deserializer=generation_pb2.TokenizeResponse.FromString)
                method(generation_pb2.TokenizeRequest(**case.request).SerializeToString(), timeout=30,
                       metadata=_metadata(case))
                return "OK", "", None
            name = "Generate" if case.rpc == "Generate" else case.rpc
            message = generation_pb2.ChatRequest if case.rpc == "Chat" else generation_pb2.GenerateRequest
            payload = case.request if isinstance(case.request, bytes) else (
                message(**(case.request or {})).SerializeToString())
            method = channel.unary_stream(f"/pagedserve.v1.GenerationService/{name}")
            list(method(payload, timeout=60, metadata=_metadata(case)))
            return "OK", "", None
        except grpc.RpcError as err:
            parsed = GenerationError.from_rpc_error(err)
            return err.code().name, err.details() or "", parsed.field


def _background(target: str, request_id: str, started: threading.Event, stop: threading.Event) -> threading.Thread:
    """A long stream in a thread, cancelled when ``stop`` is set."""

    def run():
        with Client(target) as client:
            stream = client.generate("a long one", LONG, request_id=request_id, timeout=300)
            for _ in stream:
                started.set()
                if stop.is_set():
                    stream.cancel()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def call_with_setup(svc: LocalService, case: Case) -> tuple[str, str, str | None]:
    target = svc.target
    if case.setup == "deadline":
        with Client(target) as client:
            try:
                client.complete("hi", LONG, timeout=0.3)
            except GenerationError as exc:
                return exc.code.name, exc.message, exc.field
        return "OK", "", None
    if case.setup not in ("duplicate", "queue_full"):
        return call(target, case)
    stop = threading.Event()
    first = threading.Event()
    threads = [_background(target, "dup" if case.setup == "duplicate" else "fill0", first, stop)]
    try:
        assert first.wait(60)
        if case.setup == "duplicate":
            return call(target, Case("", "", "", request={"request_id": "dup", "text": "hi",
                                                           "sampling_params": {"max_tokens": 2}}))
        # One runs (one sequence per step), two wait: the queue is full until the first finishes. The
        # two join after the first runs (submitted together with it, the third would find it full).
        threads += [_background(target, f"fill{i}", threading.Event(), stop) for i in (1, 2)]
        wait_until(lambda: svc.engine_info().stats.num_waiting == 2, 60, interval_s=0.02, what="two waiting")
        start = time.monotonic()
        with Client(target) as client:
            try:
                client.complete("one more", SamplingParams(max_tokens=2))
            except GenerationError as exc:
                assert exc.retry_after == 1.0 and time.monotonic() - start < 5
                return exc.code.name, exc.message, exc.field
        return "OK", "", None
    finally:
        stop.set()
        for t in threads:
            t.join(120)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(services, case):
    svc = services[case.service]
    code, message, field = call_with_setup(svc, case)
    assert code == case.code, (code, message)
    position = 0
    for part in case.parts():  # the documented message, with … for the variable parts
        found = message.find(part, position)
        assert found >= 0, f"{part!r} not in {message!r}"
        position = found + len(part)
    assert (field or "") == case.field
    svc.wait_all_blocks_free(timeout_s=60)


# ---- the HTTP port


def _http_request(case: Case, body: bytes, length: int | None = None, chunked: bool = False) -> bytes:
    method, path = case.rpc.split(" ", 1)
    auth = dict(_metadata(case)).get("authorization")
    head = [f"{method} {path} HTTP/1.1", "Host: test", "Connection: close", "Content-Type: application/json"]
    head += [f"Authorization: {auth}"] if auth else []
    length = len(body) if length is None else length
    head += ["Transfer-Encoding: chunked"] if chunked else [f"Content-Length: {length}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _read_response(sock: socket.socket) -> bytes:
    """One response: the head, then Content-Length bytes (or up to the end of the connection)."""
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = sock.recv(65536)
        if not chunk:
            return got
        got += chunk
    head, _, rest = got.partition(b"\r\n\r\n")
    lengths = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    while not lengths or len(rest) < lengths[0]:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return head + b"\r\n\r\n" + rest


def _send(port: int, data: bytes, then: bytes = b"", chunks: int = 0) -> bytes:
    """Sends ``data`` (then ``chunks`` chunks of 1 MB), reads one response; b"" if the server closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(data)
            for _ in range(chunks):
                sock.sendall(b"100000\r\n" + b" " * 0x100000 + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the end: the answer is still there to read
        try:
            return _read_response(sock)
        except ConnectionResetError:
            return b""


def http_call(port: int, case: Case) -> tuple[str, str, str | None]:
    """(HTTP status, error message, error param) of one case; ("closed", "", None) when the server
    closed the connection without an answer."""
    if case.setup == "raw":
        raw = _send(port, case.request)
    elif case.setup == "declared_100mb":
        raw = _send(port, _http_request(case, b"0123456789", length=100_000_000))
    elif case.setup == "chunked_5mb":
        raw = _send(port, _http_request(case, b"", chunked=True), chunks=5)
    elif case.setup == "slow_body":
        raw = _send(port, _http_request(case, b"0123456789", length=1000))
    elif case.setup == "slow_head":
        raw = _send(port, b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nX-Slow: ")
    else:
        request = case.request if isinstance(case.request, bytes) else (
            b"" if case.request is None else json.dumps(case.request).encode())
        raw = _send(port, _http_request(case, request))
    if not raw:
        return "closed", "", None
    head, _, payload = raw.partition(b"\r\n\r\n")
    status = head.split(b" ")[1].decode()
    try:
        error = json.loads(payload).get("error")
    except ValueError:  # aiohttp's own answer to what is not HTTP: plain text
        return status, payload.decode(errors="replace"), None
    return (status, error["message"], error["param"]) if error else (status, "", None)


@pytest.mark.slow
@pytest.mark.parametrize("case", HTTP_CASES, ids=[c.name for c in HTTP_CASES])
def test_bad_http_input(services, case):
    svc = services[case.service]
    code, message, field = http_call(svc.http_port(), case)
    assert code == case.code, (code, message)
    position = 0
    for part in case.parts():
        found = message.find(part, position)
        assert found >= 0, f"{part!r} not in {message!r}"
        position = found + len(part)
    assert (field or "") == case.field
    svc.wait_all_blocks_free(timeout_s=60)


@pytest.mark.slow
def test_malformed_http_requests_log_no_traceback(services):
    """Malformed requests, before authentication: at most one structured line a few seconds, never a
    traceback (each wrote one, multi-line, into the JSON log)."""
    svc = services["token"]
    for _ in range(20):
        assert http_call(svc.http_port(), Case("", "", "", request=b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
                                                setup="raw"))[0] == "400"
    logs = "".join(p.read_text() for p in svc.log_dir.glob("gateway*.log"))
    assert "Traceback" not in logs and "Error handling request" not in logs
    assert 1 <= logs.count("malformed http request") <= 2, logs[-3000:]
