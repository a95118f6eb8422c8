"""The gateway in process, against a scripted fake SchedulerService: streaming and coalescing, Abort
upstream on cancel, deadline and stop strings, status mapping of scheduler errors and of a lost
stream, health while not ready and while draining, and the unary methods."""

import asyncio
import contextlib

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

import clients  # noqa: F401

# isort: split
from pagedserve.client import AsyncClient, Client, GenerationError, SamplingParams
from pagedserve.internal.v1 import scheduler_pb2, scheduler_pb2_grpc
from scheduler_svc.engine import UNAVAILABLE
from scheduler_svc.gateway.server import SERVICE_NAME, Gateway
from scheduler_svc.gateway.tokenizer import Tokenizer
from scheduler_svc.service import SERVER_OPTIONS
from tests.factories import make_checkpoint
from tests.waiting import wait_until_async

LENGTH = scheduler_pb2.FINISH_REASON_LENGTH
TEXT = "hello world, paged attention streams café 日本語 😀 tokens"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "demo")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return Tokenizer(model_dir)


class FakeScheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    """Plays ``script(submit)`` for each Submit: a list of per-step token lists (the last step finishes
    with LENGTH), or a list of per-step RequestOutput lists, or one RequestOutput to send at once.
    Records submits and aborts."""

    def __init__(self, script):
        self.script = script
        self.ready = True
        self.step_s = 0.0
        self.submits: list[scheduler_pb2.Submit] = []
        self.aborts: list[str] = []
        self.num_info_calls = 0
        self._streams: list[asyncio.Queue] = []

    async def GetEngineInfo(self, request, context):
        self.num_info_calls += 1
        return scheduler_pb2.EngineInfo(
            ready=self.ready, architecture="LlamaForCausalLM", max_model_len=16384, vocab_size=1000, block_size=16,
            num_blocks=8, dtype="float32", eos_token_ids=[1], world_size=1,
        )

    async def Connect(self, request_iterator, context):
        out: asyncio.Queue = asyncio.Queue()
        self._streams.append(out)
        running: dict[str, asyncio.Task] = {}

        async def play(submit):
            steps = self.script(submit)
            if isinstance(steps, scheduler_pb2.RequestOutput):
                steps.request_id = submit.request_id
                out.put_nowait(scheduler_pb2.SchedulerEvent(outputs=[steps]))
                return
            for i, step in enumerate(steps):
                await asyncio.sleep(self.step_s)
                if step and isinstance(step[0], scheduler_pb2.RequestOutput):
                    for o in step:
                        o.request_id = submit.request_id
                    out.put_nowait(scheduler_pb2.SchedulerEvent(step_id=i, outputs=step))
                    continue
                o = scheduler_pb2.RequestOutput(request_id=submit.request_id, token_ids=step,
                                                num_prompt_tokens=len(submit.prompt_token_ids))
                if i == len(steps) - 1:
                    o.finish_reason = LENGTH
                out.put_nowait(scheduler_pb2.SchedulerEvent(step_id=i, outputs=[o]))

        async def read():
            async for msg in request_iterator:
                if msg.WhichOneof("kind") == "submit":
                    self.submits.append(msg.submit)
                    running[msg.submit.request_id] = asyncio.create_task(play(msg.submit))
                else:
                    self.aborts.append(msg.abort.request_id)
                    task = running.pop(msg.abort.request_id, None)
                    if task is not None:
                        task.cancel()
            out.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (event := await out.get()) is not None:
                if event == "break":
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "the scheduler went away")
                await context.write(event)
        finally:
            reader.cancel()
            for task in running.values():
                task.cancel()

    def break_streams(self):
        for q in self._streams:
            q.put_nowait("break")


@contextlib.asynccontextmanager
async def gateway_stack(model_dir, fake, build_server, limits=None, **client_kw):
    """``fake`` served as the scheduler, a Gateway on it, the gRPC server ``build_server(gateway)`` makes
    (it returns the server and its target), and a client of it; yields (client, gateway, target)."""
    # The scheduler service's own options: its keepalive permit, so an idle gateway is not told
    # too_many_pings (a long test would see the stream dropped and reopened)
    sched = grpc.aio.server(options=SERVER_OPTIONS)
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(fake, sched)
    sched_port = sched.add_insecure_port("127.0.0.1:0")
    await sched.start()
    gateway = Gateway(model_dir, f"127.0.0.1:{sched_port}", **({"limits": limits} if limits is not None else {}))
    server, target = build_server(gateway)
    watcher = await gateway.start()
    await server.start()
    client = AsyncClient(target, **client_kw)
    try:
        yield client, gateway, target
    finally:
        watcher.cancel()
        await client.close()
        await server.stop(None)
        await gateway.close()
        await sched.stop(None)


@contextlib.asynccontextmanager
async def running(model_dir, fake, client_options=()):
    def plain_server(gateway):
        server = grpc.aio.server()
        gateway.add_to_server(server)
        return server, f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"

    async with gateway_stack(model_dir, fake, plain_server, options=client_options) as (client, gateway, target):
        if fake.ready:
            await client.wait_ready(timeout=20)
        yield client, gateway, target


def one_token_per_step(tokenizer, text=TEXT):
    ids = tokenizer.encode(text)
    return lambda submit: [[t] for t in ids]


def test_streams_exact_text_and_usage(model_dir, tokenizer):
    fake = FakeScheduler(one_token_per_step(tokenizer))

    async def scenario():
        async with running(model_dir, fake) as (client, _, _):
            chunks = [c async for c in client.generate("a prompt", SamplingParams(max_tokens=50))]
            assert "".join(c.text for c in chunks) == TEXT
            assert [t for c in chunks for t in c.token_ids] == tokenizer.encode(TEXT)
            last = chunks[-1]
            assert last.finish_reason == "length"
            assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (
                len(tokenizer.encode("a prompt")), len(tokenizer.encode(TEXT)))
            assert all(c.finish_reason is None for c in chunks[:-1])
            (submit,) = fake.submits
            assert list(submit.prompt_token_ids) == tokenizer.encode("a prompt")
            assert (submit.sampling_params.max_tokens, submit.sampling_params.temperature) == (50, 1.0)
            assert fake.aborts == []  # the scheduler finished it itself

    asyncio.run(scenario())


@pytest.mark.slow  # the reader sleeps a second: that is the test
def test_slow_reader_gets_several_tokens_per_response(model_dir, tokenizer):
    fake = FakeScheduler(lambda submit: [[7]] * 1500)
    fake.step_s = 0.0005
    # A small, fixed flow-control window: the gateway's writes block while the client sleeps.
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]

    async def scenario():
        async with running(model_dir, fake, options) as (client, _, _):
            stream = client.generate("p", SamplingParams(max_tokens=1500, ignore_eos=True))
            chunks = [await stream.__anext__()]
            await asyncio.sleep(1.0)
            chunks += [c async for c in stream]
            assert sum(len(c.token_ids) for c in chunks) == 1500
            assert len(chunks) < 1500 and max(len(c.token_ids) for c in chunks) > 1

    asyncio.run(scenario())


def test_parallel_samples_and_beams(model_dir, tokenizer):
    def out(index, token_ids=(), reason=0, final=()):
        return scheduler_pb2.RequestOutput(index=index, token_ids=token_ids, finish_reason=reason,
                                           final_token_ids=final)

    a, b = tokenizer.encode("hello world"), tokenizer.encode("café 日本語")
    scripts = {
        # n = 2: both samples stream; sample 1 ends first
        "n2": [[out(0, a[:1]), out(1, b[:1])], [out(0, a[1:]), out(1, b[1:], LENGTH)], [out(0, [], LENGTH)]],
        # beam search: nothing until the search ends, then every beam at once, best first
        "beams": [[out(0, final=b, reason=LENGTH), out(1, final=a + [1], reason=scheduler_pb2.FINISH_REASON_STOP)]],
    }
    fake = FakeScheduler(lambda submit: scripts[submit.request_id])

    async def scenario():
        async with running(model_dir, fake) as (client, _, _):
            samples = await client.complete("p", SamplingParams(max_tokens=20, n=2, seed=1), request_id="n2")
            assert [(c.index, c.text, c.finish_reason) for c in samples] == [
                (0, "hello world", "length"), (1, "café 日本語", "length")]
            assert fake.submits[0].sampling_params.n == 2
            beams = await client.complete("p", SamplingParams(max_tokens=20, beam_width=2), request_id="beams")
            assert [(c.index, c.token_ids, c.text, c.finish_reason) for c in beams] == [
                (0, b, "café 日本語", "length"), (1, a + [1], "hello world", "stop")]
            assert beams[1].usage.completion_tokens == len(a) + 1
            assert fake.aborts == []

    asyncio.run(scenario())


def test_cancel_and_deadline_abort_upstream(model_dir, tokenizer):
    fake = FakeScheduler(lambda submit: [[7]] * 10_000)
    fake.step_s = 0.002

    async def scenario():
        async with running(model_dir, fake) as (client, _, _):
            stream = client.generate("p", SamplingParams(max_tokens=10_000), request_id="cancel-me")
            await stream.__anext__()
            stream.cancel()
            assert [c async for c in stream] == []
            await wait_until_async(lambda: "cancel-me" in fake.aborts, 10, what="the Abort of 'cancel-me' upstream")

            with pytest.raises(GenerationError) as err:
                async for _ in client.generate("p", SamplingParams(max_tokens=10_000), request_id="late",
                                               timeout=0.5):
                    pass
            assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            await wait_until_async(lambda: "late" in fake.aborts, 10, what="the Abort of 'late' upstream")

    asyncio.run(scenario())


def test_sync_client_cancel_aborts_upstream(model_dir):
    fake = FakeScheduler(lambda submit: [[7]] * 10_000)
    fake.step_s = 0.002

    def sync_calls(target):
        with Client(target) as client:
            stream = client.generate("p", SamplingParams(max_tokens=10_000), request_id="sync")
            first = next(stream)
            stream.cancel()
            return [first, *stream]

    async def scenario():
        async with running(model_dir, fake) as (_, _, target):
            chunks = await asyncio.to_thread(sync_calls, target)
            assert chunks and all(c.token_ids == (7,) for c in chunks)
            await wait_until_async(lambda: "sync" in fake.aborts, 10, what="the Abort of 'sync' upstream")

    asyncio.run(scenario())


def test_stop_string_ends_the_stream_and_aborts_upstream(model_dir, tokenizer):
    ids = tokenizer.encode(TEXT)
    fake = FakeScheduler(lambda submit: [[t] for t in ids] + [[7]] * 1000)
    fake.step_s = 0.001

    async def scenario():
        async with running(model_dir, fake) as (client, _, _):
            (done,) = await client.complete("p", SamplingParams(max_tokens=2000, stop=["attention", "😀"]),
                                            request_id="stopper")
            assert done.text == TEXT[: TEXT.index("attention")]
            assert done.finish_reason == "stop"
            assert tokenizer.decode(done.token_ids).startswith(done.text + "attention")
            await wait_until_async(lambda: "stopper" in fake.aborts, 10, what="the Abort of 'stopper' upstream")

    asyncio.run(scenario())


def test_scheduler_errors_map_to_status_codes(model_dir):
    errors = {
        "big": scheduler_pb2.RequestOutput(finish_reason=scheduler_pb2.FINISH_REASON_ERROR,
                                           error="needs 9 KV blocks; the pool has 8",
                                           error_field="max_tokens"),
        "dead": scheduler_pb2.RequestOutput(finish_reason=scheduler_pb2.FINISH_REASON_ERROR,
                                            error="engine failed: a worker disconnected",
                                            status_code=UNAVAILABLE),  # as the engine sends it
        "odd": scheduler_pb2.RequestOutput(finish_reason=scheduler_pb2.FINISH_REASON_ERROR,
                                           error="step failed on a worker: boom"),
    }
    fake = FakeScheduler(lambda submit: errors[submit.request_id])

    async def scenario():
        async with running(model_dir, fake) as (client, _, _):
            got = {}
            for rid in errors:
                with pytest.raises(GenerationError) as err:
                    await client.complete("p", SamplingParams(max_tokens=5), request_id=rid)
                got[rid] = (err.value.code, err.value.field)
            assert got == {
                "big": (grpc.StatusCode.INVALID_ARGUMENT, "sampling_params.max_tokens"),
                "dead": (grpc.StatusCode.UNAVAILABLE, None),
                "odd": (grpc.StatusCode.INTERNAL, None),
            }
            assert fake.aborts == []  # failed requests hold nothing upstream

    asyncio.run(scenario())


def test_a_request_the_gateway_fails_on_ends_internal_naming_the_cause(model_dir, monkeypatch):
    """A bug that one request's tokens reach in the gateway (here: detokenizing token 999) ends that
    call with INTERNAL naming the exception, not UNKNOWN with a repr; it is aborted upstream and the
    other calls go on."""
    from scheduler_svc.gateway.response_stream import SampleStream

    real_feed = SampleStream.feed

    def feed(self, item):
        if 999 in item.token_ids:
            raise ValueError("boom")
        real_feed(self, item)

    monkeypatch.setattr(SampleStream, "feed", feed)
    fake = FakeScheduler(lambda submit: [[7], [999], [8]] if submit.request_id == "bad" else [[7], [8]])

    async def scenario():
        async with running(model_dir, fake) as (client, _, _):
            with pytest.raises(GenerationError) as err:
                await client.complete("p", SamplingParams(max_tokens=5), request_id="bad")
            assert err.value.code == grpc.StatusCode.INTERNAL
            assert err.value.message == "the gateway could not process this request: ValueError: boom"
            (done,) = await client.complete("p", SamplingParams(max_tokens=5), request_id="good")
            assert done.token_ids == [7, 8]
            await wait_until_async(lambda: fake.aborts == ["bad"], 10, what="the abort upstream")

    asyncio.run(scenario())


def test_lost_stream_fails_requests_with_unavailable_then_reconnects(model_dir, tokenizer):
    fake = FakeScheduler(lambda submit: [[7]] * 10_000 if submit.request_id == "long" else [[7], [8]])
    fake.step_s = 0.002

    async def scenario():
        async with running(model_dir, fake) as (client, gateway, _):
            stream = client.generate("p", SamplingParams(max_tokens=10_000), request_id="long")
            await stream.__anext__()
            fake.break_streams()
            with pytest.raises(GenerationError) as err:
                async for _ in stream:
                    pass
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
            # The watcher opens a new stream (health may stay SERVING through so short a gap: wait for the
            # stream itself, not for health, or a request can land in the gap and get "not ready").
            await wait_until_async(lambda: len(fake._streams) >= 2 and gateway.engines.connected, 10,
                                   what="the gateway's new Connect stream")
            (done,) = await client.complete("p", SamplingParams(max_tokens=5), request_id="after")
            assert done.token_ids == [7, 8]

    asyncio.run(scenario())


def test_not_serving_until_the_scheduler_is_ready(model_dir, tokenizer):
    fake = FakeScheduler(one_token_per_step(tokenizer, "ok"))
    fake.ready = False

    async def scenario():
        async with running(model_dir, fake) as (client, _, _):
            # A second poll means the gateway has acted on the first answer (not ready).
            await wait_until_async(lambda: fake.num_info_calls >= 2, 10, what="the gateway to ask twice")
            assert not await client.is_serving()
            with pytest.raises(GenerationError) as err:
                await client.complete("p", SamplingParams(max_tokens=5))
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
            fake.ready = True
            await client.wait_ready(timeout=10)
            (done,) = await client.complete("p", SamplingParams(max_tokens=5))
            assert done.text == "ok"

    asyncio.run(scenario())


def test_drain_lets_running_streams_finish(model_dir, tokenizer):
    fake = FakeScheduler(lambda submit: [[7]] * 50)
    fake.step_s = 0.01

    async def scenario():
        async with running(model_dir, fake) as (client, gateway, target):
            stream = client.generate("p", SamplingParams(max_tokens=100))
            first = await stream.__anext__()
            drain = asyncio.create_task(gateway.drain(timeout_s=30))
            await wait_until_async(lambda: gateway.core.draining, 10, what="the gateway to drain")
            async with grpc.aio.insecure_channel(target) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(GenerationError) as err:
                await client.complete("p", SamplingParams(max_tokens=5))
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
            rest = [c async for c in stream]
            assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 50
            assert rest[-1].finish_reason == "length"
            await asyncio.wait_for(drain, 10)

    asyncio.run(scenario())


def test_drain_timeout_ends_streams_with_abort(model_dir):
    fake = FakeScheduler(lambda submit: [[7]] * 10_000)
    fake.step_s = 0.002

    async def scenario():
        async with running(model_dir, fake) as (client, gateway, _):
            stream = client.generate("p", SamplingParams(max_tokens=10_000), request_id="slow")
            await stream.__anext__()
            await gateway.drain(timeout_s=0.3)
            chunks = [c async for c in stream]
            assert chunks[-1].finish_reason == "abort"
            await wait_until_async(lambda: "slow" in fake.aborts, 10, what="the Abort of 'slow' upstream")

    asyncio.run(scenario())


def test_duplicate_request_id_in_flight_is_refused(model_dir):
    fake = FakeScheduler(lambda submit: [[7]] * 10_000)
    fake.step_s = 0.002

    async def scenario():
        async with running(model_dir, fake) as (client, _, _):
            stream = client.generate("p", SamplingParams(max_tokens=10_000), request_id="same")
            await stream.__anext__()
            with pytest.raises(GenerationError) as err:
                await client.complete("p", SamplingParams(max_tokens=5), request_id="same")
            assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
            stream.cancel()

    asyncio.run(scenario())


def test_invalid_request_names_the_field(model_dir):
    fake = FakeScheduler(lambda submit: [[7]])

    async def scenario():
        async with running(model_dir, fake) as (client, _, _):
            with pytest.raises(GenerationError) as err:
                await client.complete("p", SamplingParams(max_tokens=5, top_p=1.5))
            assert (err.value.code, err.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, "sampling_params.top_p")
            assert err.value.message.startswith("sampling_params.top_p: ")
            assert fake.submits == []

    asyncio.run(scenario())


def test_tokenize_model_info_and_reflection(model_dir, tokenizer):
    fake = FakeScheduler(lambda submit: [[7]])

    async def scenario():
        async with running(model_dir, fake) as (client, _, target):
            assert await client.tokenize("hello café") == tokenizer.encode("hello café")
            info = await client.model_info()
            assert (info.model, info.architecture, info.max_model_len, info.num_kv_blocks) == (
                "demo", "LlamaForCausalLM", 16384, 8)
            with pytest.raises(GenerationError) as err:
                await client.tokenize("x", model="other")
            assert (err.value.code, err.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, "model")

    asyncio.run(scenario())


def test_reflection_lists_the_services(model_dir):
    fake = FakeScheduler(lambda submit: [[7]])

    async def check():
        async with running(model_dir, fake) as (_, _, target):
            services = await asyncio.to_thread(_list_services, target)
            assert {SERVICE_NAME, "grpc.health.v1.Health"} <= set(services)

    asyncio.run(check())


def _list_services(target: str) -> list[str]:
    with grpc.insecure_channel(target) as channel:
        return ProtoReflectionDescriptorDatabase(channel).get_services()


def test_the_scheduler_permits_the_pings_of_the_shortest_keepalive():
    """The keepalive a gateway may be given and the ping interval its scheduler permits agree (a server
    option under a wrong name is ignored silently: the permitted interval stays grpcio's 5 minutes)."""
    from scheduler_svc.gateway.options import MIN_KEEPALIVE_S
    from scheduler_svc.gateway.scheduler_link import channel_options
    from scheduler_svc.service import SERVER_OPTIONS

    server = dict(SERVER_OPTIONS)
    assert 2 * server["grpc.http2.min_ping_interval_without_data_ms"] <= MIN_KEEPALIVE_S * 1000
    assert server["grpc.keepalive_permit_without_calls"] == 1
    client = dict(channel_options(MIN_KEEPALIVE_S))
    assert client["grpc.keepalive_time_ms"] == 1000 and client["grpc.http2.max_pings_without_data"] == 0
    with pytest.raises(ValueError, match="at least 1 s"):
        channel_options(0.5)
