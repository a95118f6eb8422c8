"""The gateway in process, against test_server's fake scheduler, under hostile input and with security
on: corrupt and non-UTF-8 messages, oversized requests, a full queue upstream (RetryInfo), a busy
tokenizer pool, reflection v1 and v1alpha, Health/List, TLS, mutual TLS and the bearer token."""

import asyncio
import contextlib
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import clients  # noqa: F401

# isort: split
from google.protobuf import descriptor_pool, message_factory

from pagedserve.client import AsyncClient, GenerationError, SamplingParams
from pagedserve.internal.v1 import scheduler_pb2
from pagedserve.v1 import generation_pb2
from scheduler_svc.gateway import protocol
from scheduler_svc.gateway.options import GatewayLimits, SecurityConfig
from scheduler_svc.gateway.server import SERVICE_NAME, add_port, make_server
from scheduler_svc.gateway.tokenizer_pool import TokenizerBusy, TokenizerPool
from tests.certs import make_ca, make_cert
from tests.scheduler_svc.gateway.test_server import (  # noqa: F401
    FakeScheduler,
    gateway_stack,
    model_dir,
    tokenizer,
)
from tests.waiting import wait_until_async

GENERATE = f"/{SERVICE_NAME}/Generate"
TOKEN = "s3cret-token"


@contextlib.asynccontextmanager
async def gateway_at(model_dir, fake, limits=None, secure=None, **client_kw):  # noqa: F811
    """The gateway as ``serve`` builds it (make_server, add_port), on loopback; yields (client, target)."""
    limits, secure = limits or GatewayLimits(), secure or SecurityConfig()

    def served(gateway):
        server = make_server(gateway, limits, secure)
        return server, f"localhost:{add_port(server, '127.0.0.1:0', secure)}"

    async with gateway_stack(model_dir, fake, served, limits, **client_kw) as (client, gateway, target):
        await wait_until_async(lambda: gateway._serving, 20, what="the gateway to be SERVING")
        yield client, target


def raw_generate(target: str, payload: bytes, timeout: float = 30.0) -> grpc.RpcError:
    """Sends ``payload`` as the bytes of a GenerateRequest; returns the error the call ended with."""
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", -1)]) as channel:
        call = channel.unary_stream(GENERATE, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            list(call(payload, timeout=timeout))
    return err.value


def utf8_breaking(request: generation_pb2.GenerateRequest, good: str) -> bytes:
    """The request's encoding with the UTF-8 of ``good`` (a string field's value) made invalid."""
    data = request.SerializeToString()
    bad = b"\xff" * len(good.encode())
    assert data.count(good.encode()) == 1
    return data.replace(good.encode(), bad)


@pytest.mark.parametrize("make, code, field, message", [
    (lambda: utf8_breaking(generation_pb2.GenerateRequest(text="hello"), "hello"),
     grpc.StatusCode.INVALID_ARGUMENT, "text", "text: is not valid UTF-8"),
    (lambda: utf8_breaking(generation_pb2.GenerateRequest(text="hi", sampling_params=generation_pb2.SamplingParams(
        max_tokens=3, stop=["abc"])), "abc"),
     grpc.StatusCode.INVALID_ARGUMENT, "sampling_params.stop", "sampling_params.stop: is not valid UTF-8"),
    (lambda: utf8_breaking(generation_pb2.GenerateRequest(request_id="rid", text="hi"), "rid"),
     grpc.StatusCode.INVALID_ARGUMENT, "request_id", "request_id: is not valid UTF-8"),
    (lambda: b"\x1a\xff\xff\xff\xff\x0f",  # field 3 claims 4 GB follow
     grpc.StatusCode.INVALID_ARGUMENT, None, "the request is not a valid pagedserve.v1.GenerateRequest message"),
    (lambda: b"\x0f\x01", grpc.StatusCode.INVALID_ARGUMENT, None, "(corrupt or truncated encoding)"),  # wire type 7
])
def test_messages_that_do_not_parse_are_invalid_argument(model_dir, make, code, field, message):  # noqa: F811
    fake = FakeScheduler(lambda submit: [[7]])

    async def scenario():
        async with gateway_at(model_dir, fake) as (_, target):
            err = await asyncio.to_thread(raw_generate, target, make())
            assert err.code() == code and message in err.details()
            parsed = GenerationError.from_rpc_error(err)
            assert parsed.field == field
            assert fake.submits == []

    asyncio.run(scenario())


def test_an_oversized_request_is_refused_by_grpc_while_streams_go_on(model_dir):  # noqa: F811
    fake = FakeScheduler(lambda submit: [[7]] * 200)
    fake.step_s = 0.005

    async def scenario():
        async with gateway_at(model_dir, fake, GatewayLimits(max_request_bytes=2**20)) as (client, target):
            streams = [asyncio.create_task(client.complete("p", SamplingParams(max_tokens=200))) for _ in range(4)]
            await wait_until_async(lambda: len(fake.submits) == 4, 10, what="the streams to start")
            payload = generation_pb2.GenerateRequest(text="x" * (3 * 2**20)).SerializeToString()
            start = time.perf_counter()
            err = await asyncio.to_thread(raw_generate, target, payload)
            elapsed = time.perf_counter() - start
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in err.details() and elapsed < 2.0
            for done in await asyncio.gather(*streams):
                assert len(done[0].token_ids) == 200
            assert len(fake.submits) == 4

    asyncio.run(scenario())


def test_a_full_queue_upstream_is_resource_exhausted_with_a_retry_hint(model_dir):  # noqa: F811
    full = scheduler_pb2.RequestOutput(finish_reason=scheduler_pb2.FINISH_REASON_ERROR, status_code=8,
                                       retry_after_ms=1500, error="the server is at capacity: retry later")
    fake = FakeScheduler(lambda submit: full)

    async def scenario():
        async with gateway_at(model_dir, fake) as (client, _):
            with pytest.raises(GenerationError) as err:
                await client.complete("p", SamplingParams(max_tokens=5))
            assert (err.value.code, err.value.retry_after, err.value.field) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED, 1.5, None)
            assert err.value.message == "the server is at capacity: retry later"

    asyncio.run(scenario())


class ShortContextFake(FakeScheduler):
    async def GetEngineInfo(self, request, context):
        info = await super().GetEngineInfo(request, context)
        info.max_model_len = 64
        return info


def test_a_prompt_longer_than_the_context_can_hold_is_refused_before_tokenizing(model_dir, monkeypatch):  # noqa: F811
    fake = ShortContextFake(lambda submit: [[7]])

    async def scenario():
        async with gateway_at(model_dir, fake) as (client, _):
            calls = []
            original = TokenizerPool.encode

            async def counting(self, text, *args, **kwargs):
                calls.append(len(text))
                return await original(self, text, *args, **kwargs)

            monkeypatch.setattr(TokenizerPool, "encode", counting)
            with pytest.raises(GenerationError) as err:
                await client.complete("x" * 200_000, SamplingParams(max_tokens=5))
            assert (err.value.code, err.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, "text")
            assert "is 200000 bytes long; the limit is" in err.value.message
            assert "more than a context of 64 tokens can hold" in err.value.message
            assert calls == []  # never tokenized
            (ok,) = await client.complete("hello", SamplingParams(max_tokens=1))
            assert ok.token_ids == [7] and calls == [5]

    asyncio.run(scenario())


def test_the_tokenizer_pool_is_bounded():
    release = threading.Event()

    class SlowTokenizer:
        def encode(self, text, add_special_tokens=True):
            return [1]

        def encode_releasing_gil(self, text, add_special_tokens=True):
            release.wait(10)
            return [len(text)]

    async def scenario():
        pool = TokenizerPool(SlowTokenizer(), num_threads=1, max_queued=1)
        long = "y" * 10_000
        first, second = (asyncio.create_task(pool.encode(long)) for _ in range(2))
        await wait_until_async(lambda: pool.num_in_pool == 2, 5, what="two long texts in the pool")
        with pytest.raises(TokenizerBusy, match="busy tokenizing 2 long texts"):
            await pool.encode(long)
        assert await pool.encode("short") == [1]  # short texts never wait for the pool
        second.cancel()  # a text that has not started leaves the pool at once
        await wait_until_async(lambda: pool.num_in_pool == 1, 5, what="the cancelled text to leave")
        release.set()
        assert await first == [10_000]
        await wait_until_async(lambda: pool.num_in_pool == 0, 5, what="the pool to empty")
        pool.close()

    asyncio.run(scenario())


def _reflection_v1_classes():
    protocol.reflection_v1_file()
    pool = descriptor_pool.Default()
    return tuple(message_factory.GetMessageClass(pool.FindMessageTypeByName(f"grpc.reflection.v1.{name}"))
                 for name in ("ServerReflectionRequest", "ServerReflectionResponse"))


def _ask_reflection(target: str, version: str, requests: list) -> list:
    request_cls, response_cls = _reflection_v1_classes()
    with grpc.insecure_channel(target) as channel:
        call = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                     request_serializer=request_cls.SerializeToString,
                                     response_deserializer=response_cls.FromString)
        return list(call(iter([request_cls(**r) for r in requests]), timeout=10))


def test_reflection_v1_and_v1alpha_and_health_list(model_dir):  # noqa: F811
    fake = FakeScheduler(lambda submit: [[7]])

    async def scenario():
        async with gateway_at(model_dir, fake) as (_, target):
            for version in ("v1", "v1alpha"):
                listed, found, v1_file = await asyncio.to_thread(_ask_reflection, target, version, [
                    {"list_services": ""}, {"file_containing_symbol": SERVICE_NAME},
                    {"file_containing_symbol": "grpc.reflection.v1.ServerReflection"}])
                names = {s.name for s in listed.list_services_response.service}
                assert names == {SERVICE_NAME, "pagedserve.v1.LoadService", "grpc.health.v1.Health",
                                 protocol.REFLECTION_V1_SERVICE, protocol.REFLECTION_V1ALPHA_SERVICE}, version
                assert found.file_descriptor_response.file_descriptor_proto  # the files a client can decode with
                assert not v1_file.HasField("error_response") and v1_file.file_descriptor_response.file_descriptor_proto
            async with grpc.aio.insecure_channel(target) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(), timeout=10)
            assert {name: s.status for name, s in reply.statuses.items()} == {
                "": health_pb2.HealthCheckResponse.SERVING, SERVICE_NAME: health_pb2.HealthCheckResponse.SERVING}

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pki")
    ca = make_ca(tmp / "ca")
    stranger = make_ca(tmp / "stranger", "stranger CA")
    token_file = tmp / "token"
    token_file.write_text(TOKEN + "\n")
    return {"ca": ca, "server": make_cert(tmp / "server", ca, "server"),
            "client": make_cert(tmp / "client", ca, "client", server=False),
            "stranger_client": make_cert(tmp / "stranger-client", stranger, "intruder", server=False),
            "stranger_ca": stranger, "token": str(token_file)}


async def _outcome(target: str, **client_kw) -> str:
    """OK, or the status code name a Generate call (then a health check) ends with."""
    async with AsyncClient(target, **client_kw) as client:
        try:
            (done,) = await client.complete("p", SamplingParams(max_tokens=1), timeout=10)
        except GenerationError as exc:
            return exc.code.name
        return "OK" if done.token_ids == [7] else f"wrong answer {done}"


@pytest.mark.parametrize("client, want", [
    ({"token": TOKEN}, "OK"),
    ({}, "UNAUTHENTICATED"),
    ({"token": "guess"}, "UNAUTHENTICATED"),
    ({"token": TOKEN + "x"}, "UNAUTHENTICATED"),
])
def test_bearer_token(model_dir, pki, client, want):  # noqa: F811
    fake = FakeScheduler(lambda submit: [[7]])

    async def scenario():
        secure = SecurityConfig(auth_token_file=pki["token"])
        async with gateway_at(model_dir, fake, secure=secure) as (anonymous, target):
            assert await _outcome(target, **client) == want
            assert await anonymous.is_serving()  # health checks need no token
            if want != "OK":
                assert fake.submits == []

    asyncio.run(scenario())


def test_every_client_call_carries_the_token(model_dir, pki):  # noqa: F811
    fake = FakeScheduler(lambda submit: [[7]])

    async def scenario():
        secure = SecurityConfig(auth_token_file=pki["token"])
        async with gateway_at(model_dir, fake, secure=secure) as (_, target):
            async with AsyncClient(target, token=TOKEN) as client:
                assert (await client.load()).num_engines_ready == 1
                watch = client.watch_load(interval=0.05)
                assert (await watch.__anext__()).num_engines_ready == 1
                await watch.aclose()
                with pytest.raises(GenerationError) as err:  # the demo model has no chat template
                    [c async for c in client.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=1))]
                assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION  # past the token check

    asyncio.run(scenario())


@pytest.mark.parametrize("mutual, client, want", [
    (False, {"ca_cert": "ca"}, "OK"),
    (False, {}, "UNAVAILABLE"),  # plaintext against TLS: no connection
    (False, {"ca_cert": "stranger_ca"}, "UNAVAILABLE"),  # the server's certificate is not trusted
    (True, {"ca_cert": "ca", "client_cert": "client"}, "OK"),
    (True, {"ca_cert": "ca"}, "UNAVAILABLE"),  # no client certificate
    (True, {"ca_cert": "ca", "client_cert": "stranger_client"}, "UNAVAILABLE"),  # signed by someone else
])
def test_tls_and_mutual_tls(model_dir, pki, mutual, client, want):  # noqa: F811
    fake = FakeScheduler(lambda submit: [[7]])
    secure = SecurityConfig(str(pki["server"].cert), str(pki["server"].key),
                            str(pki["ca"].cert) if mutual else None)
    kw = {}
    if "ca_cert" in client:
        kw["ca_cert"] = pki[client["ca_cert"]].cert
    if "client_cert" in client:
        kw["client_cert"], kw["client_key"] = pki[client["client_cert"]].cert, pki[client["client_cert"]].key
    server_side = {"ca_cert": pki["ca"].cert}
    if mutual:
        server_side |= {"client_cert": pki["client"].cert, "client_key": pki["client"].key}

    async def scenario():
        async with gateway_at(model_dir, fake, secure=secure, **server_side) as (_, target):
            assert await _outcome(target, **kw) == want

    asyncio.run(scenario())
