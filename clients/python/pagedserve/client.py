"""Python client of a pagedserve gateway (pagedserve.v1.GenerationService): sync and asyncio.

    import clients  # in a checkout: puts the pagedserve package on sys.path
    from pagedserve.client import Client, SamplingParams

    with Client("localhost:50051") as client:
        client.wait_ready(timeout=60)
        for chunk in client.generate("Hello", SamplingParams(max_tokens=16, temperature=0)):
            print(chunk.text, end="", flush=True)

``chat`` streams the assistant's next turn of a conversation (the gateway applies the model's chat
template): ``client.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=64))``.
``AsyncClient`` has the same methods as coroutines, and ``generate`` and ``chat`` return async iterators.
Failed calls raise ``GenerationError``, with the status code and, for INVALID_ARGUMENT, the field; for
RESOURCE_EXHAUSTED (a full queue) ``retry_after`` says in how many seconds to try again.
``load()`` and ``watch_load()`` report the engines' load behind the gateway (pagedserve.v1.LoadService),
for routers in front of pagedserve.

A gateway with TLS: ``Client(target, tls=True, ca_cert="ca.pem")`` (mutual TLS: also ``client_cert``,
``client_key``); with a token: ``Client(target, token="...")``. Certificates are PEM bytes or paths.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagedserve.sampling import SamplingParams
from pagedserve.v1 import generation_pb2, generation_pb2_grpc, load_pb2, load_pb2_grpc

_FINISH = {
    generation_pb2.FINISH_REASON_LENGTH: "length",
    generation_pb2.FINISH_REASON_STOP: "stop",
    generation_pb2.FINISH_REASON_ABORT: "abort",
}
_STATUS_DETAILS_KEY = "grpc-status-details-bin"
Message = Mapping[str, str] | tuple[str, str]  # {"role": ..., "content": ...} or (role, content)



@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, log probability), best first
    text: str = ""  # the token's text alone
    top_texts: tuple[str, ...] = ()  # the text of each of ``top``


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int


@dataclass(frozen=True, slots=True)
class GenerateChunk:
    """One streamed response: new tokens of sample ``index`` and their text; the last one of a sample
    has ``finish_reason`` ("length", "stop" or "abort") and ``usage``."""

    request_id: str
    index: int
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    usage: Usage | None = None
    # With prompt_logprobs, in a sample's first chunk: prompt tokens 1.. (the first has none).
    prompt_logprobs: tuple[TokenLogprob, ...] = ()

    @classmethod
    def from_proto(cls, r: generation_pb2.GenerateResponse) -> GenerateChunk:
        return cls(
            request_id=r.request_id,
            index=r.index,
            token_ids=tuple(r.token_ids),
            text=r.text,
            logprobs=tuple(
                TokenLogprob(lp.token_id, lp.logprob, tuple((t.token_id, t.logprob) for t in lp.top), lp.text,
                             tuple(t.text for t in lp.top))
                for lp in r.logprobs
            ),
            finish_reason=_FINISH.get(r.finish_reason),
            usage=Usage(r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.cached_prompt_tokens)
            if r.HasField("usage") else None,
            prompt_logprobs=tuple(
                TokenLogprob(lp.token_id, lp.logprob, tuple((t.token_id, t.logprob) for t in lp.top), lp.text,
                             tuple(t.text for t in lp.top))
                for lp in r.prompt_logprobs
            ),
        )


@dataclass(slots=True)
class Completion:
    """A whole sample, collected from its chunks."""

    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    usage: Usage | None
    logprobs: list[TokenLogprob]
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # prompt tokens 1.., when asked


class GenerationError(Exception):
    """A failed call: ``code`` (grpc.StatusCode), ``message``, for a bad request ``field``, and for a
    refusal under load ``retry_after`` (seconds, from a google.rpc.RetryInfo detail)."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code, self.message, self.field, self.retry_after = code, message, field, retry_after

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> GenerationError:
        field = retry_after = None
        for key, value in err.trailing_metadata() or ():
            if key == _STATUS_DETAILS_KEY:
                for detail in status_pb2.Status.FromString(value).details:
                    bad, retry = error_details_pb2.BadRequest(), error_details_pb2.RetryInfo()
                    if detail.Unpack(bad) and bad.field_violations:
                        field = bad.field_violations[0].field
                    elif detail.Unpack(retry):
                        retry_after = retry.retry_delay.ToMilliseconds() / 1000
        return cls(err.code(), err.details() or "", field, retry_after)


def _pem(value: bytes | str | Path | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


class _Connection:
    """The channel, stubs and per-call metadata that Client (``grpc``) and AsyncClient (``grpc.aio``) share."""

    def _connect(self, channels, target: str, options, tls: bool, ca_cert, client_cert, client_key,
                 token: str | None) -> None:
        credentials = None
        if tls or ca_cert is not None or client_cert is not None:
            credentials = grpc.ssl_channel_credentials(_pem(ca_cert), _pem(client_key), _pem(client_cert))
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel = (channels.secure_channel(target, credentials, options=list(options)) if credentials
                         else channels.insecure_channel(target, options=list(options)))
        self._stub = generation_pb2_grpc.GenerationServiceStub(self._channel)
        self._load = load_pb2_grpc.LoadServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)


def _request(prompt: str | Sequence[int], params: SamplingParams | None, request_id: str, model: str):
    req = generation_pb2.GenerateRequest(
        request_id=request_id, model=model, sampling_params=(params or SamplingParams()).to_proto()
    )
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return req


def _chat_request(messages: Sequence[Message], params: SamplingParams | None, request_id: str, model: str):
    req = generation_pb2.ChatRequest(
        request_id=request_id, model=model, sampling_params=(params or SamplingParams()).to_proto()
    )
    for m in messages:
        role, content = (m["role"], m["content"]) if isinstance(m, Mapping) else m
        req.messages.add(role=role, content=content)
    return req


def collect(chunks: list[GenerateChunk]) -> list[Completion]:
    """The samples of a call, each whole (Completion), by index."""
    out: dict[int, Completion] = {}
    for c in chunks:
        comp = out.setdefault(c.index, Completion(c.index, [], "", None, None, []))
        comp.token_ids += c.token_ids
        comp.text += c.text
        comp.logprobs += c.logprobs
        comp.prompt_logprobs += c.prompt_logprobs
        if c.finish_reason is not None:
            comp.finish_reason, comp.usage = c.finish_reason, c.usage
    return [out[i] for i in sorted(out)]


# ---- sync


class GenerateStream(Iterator[GenerateChunk]):
    """The responses of one Generate call; ``cancel()`` ends it (the server frees the request's blocks)."""

    def __init__(self, call) -> None:
        self._call = call
        self._cancelled = False

    def __next__(self) -> GenerateChunk:
        try:
            return GenerateChunk.from_proto(next(self._call))
        except grpc.RpcError as err:
            if self._cancelled and err.code() == grpc.StatusCode.CANCELLED:
                raise StopIteration from None
            raise GenerationError.from_rpc_error(err) from None

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()


class Client(_Connection):
    def __init__(self, target: str, *, options: Sequence[tuple[str, object]] = (), tls: bool = False,
                 ca_cert: bytes | str | Path | None = None, client_cert: bytes | str | Path | None = None,
                 client_key: bytes | str | Path | None = None, token: str | None = None) -> None:
        self._connect(grpc, target, options, tls, ca_cert, client_cert, client_key, token)

    def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str = "",
        model: str = "",
        timeout: float | None = None,
    ) -> GenerateStream:
        """Streams the completion of ``prompt`` (text or token ids)."""
        return GenerateStream(self._stub.Generate(_request(prompt, params, request_id, model), timeout=timeout,
                                                  metadata=self._metadata))

    def complete(self, prompt: str | Sequence[int], params: SamplingParams | None = None, **kwargs) -> list[Completion]:
        """Generates and collects: one Completion per sample, by index."""
        return collect(list(self.generate(prompt, params, **kwargs)))

    def chat(
        self,
        messages: Sequence[Message],
        params: SamplingParams | None = None,
        *,
        request_id: str = "",
        model: str = "",
        timeout: float | None = None,
    ) -> GenerateStream:
        """Streams the assistant's next turn after ``messages`` (oldest first), rendered by the gateway
        with the model's chat template; FAILED_PRECONDITION when the model has none."""
        return GenerateStream(self._stub.Chat(_chat_request(messages, params, request_id, model), timeout=timeout,
                                              metadata=self._metadata))

    def complete_chat(self, messages: Sequence[Message], params: SamplingParams | None = None,
                      **kwargs) -> list[Completion]:
        """chat, collected: one Completion per sample, by index."""
        return collect(list(self.chat(messages, params, **kwargs)))

    def tokenize(self, text: str, *, model: str = "", timeout: float | None = 30.0) -> list[int]:
        try:
            return list(self._stub.Tokenize(generation_pb2.TokenizeRequest(text=text, model=model),
                                            timeout=timeout, metadata=self._metadata).token_ids)
        except grpc.RpcError as err:
            raise GenerationError.from_rpc_error(err) from None

    def model_info(self, *, timeout: float | None = 30.0) -> generation_pb2.GetModelInfoResponse:
        try:
            return self._stub.GetModelInfo(generation_pb2.GetModelInfoRequest(), timeout=timeout,
                                           metadata=self._metadata)
        except grpc.RpcError as err:
            raise GenerationError.from_rpc_error(err) from None

    def load(self, *, timeout: float | None = 30.0) -> load_pb2.GetLoadResponse:
        """Each engine's load as the gateway last heard it (running, waiting, KV usage, prefix-cache hits)."""
        try:
            return self._load.GetLoad(load_pb2.GetLoadRequest(), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise GenerationError.from_rpc_error(err) from None

    def watch_load(self, interval: float = 1.0) -> Iterator[load_pb2.GetLoadResponse]:
        """The load now, then whenever it changed, at most once per ``interval`` seconds, until closed."""
        call = self._load.WatchLoad(load_pb2.WatchLoadRequest(interval_ms=int(interval * 1000)),
                                    metadata=self._metadata)
        try:
            yield from call
        except grpc.RpcError as err:
            raise GenerationError.from_rpc_error(err) from None
        finally:
            call.cancel()

    def is_serving(self, timeout: float = 2.0) -> bool:
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Waits until the gateway's health is SERVING; raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while not self.is_serving():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gateway was not SERVING within {timeout:g} s")
            time.sleep(0.2)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- asyncio


class AsyncGenerateStream(AsyncIterator[GenerateChunk]):
    def __init__(self, call) -> None:
        self._call = call
        self._cancelled = False

    async def __anext__(self) -> GenerateChunk:
        try:
            resp = await self._call.read()
        except grpc.RpcError as err:  # grpc.aio.AioRpcError
            if self._cancelled and err.code() == grpc.StatusCode.CANCELLED:
                raise StopAsyncIteration from None
            raise GenerationError.from_rpc_error(err) from None
        except asyncio.CancelledError:
            if self._cancelled:  # reading a call we cancelled ourselves: the stream simply ends
                raise StopAsyncIteration from None
            raise
        if resp is grpc.aio.EOF:
            raise StopAsyncIteration
        return GenerateChunk.from_proto(resp)

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()


class AsyncClient(_Connection):
    def __init__(self, target: str, *, options: Sequence[tuple[str, object]] = (), tls: bool = False,
                 ca_cert: bytes | str | Path | None = None, client_cert: bytes | str | Path | None = None,
                 client_key: bytes | str | Path | None = None, token: str | None = None) -> None:
        self._connect(grpc.aio, target, options, tls, ca_cert, client_cert, client_key, token)

    def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str = "",
        model: str = "",
        timeout: float | None = None,
    ) -> AsyncGenerateStream:
        return AsyncGenerateStream(self._stub.Generate(_request(prompt, params, request_id, model), timeout=timeout,
                                                       metadata=self._metadata))

    async def complete(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                       **kwargs) -> list[Completion]:
        return collect([c async for c in self.generate(prompt, params, **kwargs)])

    def chat(
        self,
        messages: Sequence[Message],
        params: SamplingParams | None = None,
        *,
        request_id: str = "",
        model: str = "",
        timeout: float | None = None,
    ) -> AsyncGenerateStream:
        return AsyncGenerateStream(self._stub.Chat(_chat_request(messages, params, request_id, model),
                                                   timeout=timeout, metadata=self._metadata))

    async def complete_chat(self, messages: Sequence[Message], params: SamplingParams | None = None,
                            **kwargs) -> list[Completion]:
        return collect([c async for c in self.chat(messages, params, **kwargs)])

    async def tokenize(self, text: str, *, model: str = "", timeout: float | None = 30.0) -> list[int]:
        try:
            reply = await self._stub.Tokenize(generation_pb2.TokenizeRequest(text=text, model=model), timeout=timeout,
                                              metadata=self._metadata)
        except grpc.RpcError as err:
            raise GenerationError.from_rpc_error(err) from None
        return list(reply.token_ids)

    async def model_info(self, *, timeout: float | None = 30.0) -> generation_pb2.GetModelInfoResponse:
        try:
            return await self._stub.GetModelInfo(generation_pb2.GetModelInfoRequest(), timeout=timeout,
                                                 metadata=self._metadata)
        except grpc.RpcError as err:
            raise GenerationError.from_rpc_error(err) from None

    async def load(self, *, timeout: float | None = 30.0) -> load_pb2.GetLoadResponse:
        try:
            return await self._load.GetLoad(load_pb2.GetLoadRequest(), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise GenerationError.from_rpc_error(err) from None

    async def watch_load(self, interval: float = 1.0) -> AsyncIterator[load_pb2.GetLoadResponse]:
        call = self._load.WatchLoad(load_pb2.WatchLoadRequest(interval_ms=int(interval * 1000)),
                                    metadata=self._metadata)
        try:
            async for report in call:
                yield report
        except grpc.RpcError as err:
            raise GenerationError.from_rpc_error(err) from None
        finally:
            call.cancel()

    async def is_serving(self, timeout: float = 2.0) -> bool:
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not await self.is_serving():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gateway was not SERVING within {timeout:g} s")
            await asyncio.sleep(0.2)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
