"""OpenAI-compatible HTTP beside gRPC: GET /v1/models, POST /v1/completions, POST /v1/chat/completions,
whole or streamed as server-sent events (``data: {...}`` per chunk, ``data: [DONE]`` last).

It runs in the gateway's process and event loop, on aiohttp (asyncio-native, so the server starts as a
task of the loop that runs grpc.aio: no second loop, no thread, no second server process), and is a
thin face of GenerationCore like the gRPC servicer: the same validation, the same request log, and the
same cancellation. A client that goes away cancels its handler (``handler_cancellation``), which
closes the request's response iterator, which aborts it upstream, so its KV blocks are freed within
a step. Errors, before the stream starts, are OpenAI's error object with the HTTP status of the gRPC
code; once a stream has started they come as a last ``data: {"error": ...}`` event.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from aiohttp import web

import clients  # noqa: F401
from gpu_worker import log
from gpu_worker.sampling_params import MAX_TOP_LOGPROBS
from pagedserve.v1 import generation_pb2
from scheduler_svc.gateway.chat import ChatPrompts
from scheduler_svc.gateway.generation import GenerationCore, GenerationFailed
from scheduler_svc.gateway.http_limits import (
    ConnectionGuard,
    GuardedSite,
    check_prompt_count,
    check_sequences,
    client_error_logger,
    read_json,
)
from scheduler_svc.gateway.http_options import HttpLimits
from scheduler_svc.gateway.openai_params import chat_echo, chat_render_options, check_fields, vllm_sampling
from scheduler_svc.gateway.openai_protocol import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    ApiError,
    Choice,
    LogprobFormat,
    StreamOptions,
    Usage,
    bool_param,
    chat_messages,
    check_completion_extras,
    completion_prompts,
    finish_reason,
    int_param,
    max_tokens_of,
    sampling_params,
    stream_options,
)
from scheduler_svc.gateway.openai_routes import add_routes
from scheduler_svc.gateway.openai_sampling import EchoShape, engine_params, generation_free
from scheduler_svc.gateway.security import bearer_matches
from scheduler_svc.gateway.tools import TOOL_FIELDS, ToolCallsShape, parse_tool_request
from scheduler_svc.gateway.validation import shown

Batch = tuple[int, list[generation_pb2.GenerateResponse]]  # (prompt index, responses)


async def responses(core: GenerationCore, requests: list[generation_pb2.GenerateRequest],
                    in_flight: int = 1 << 30) -> AsyncIterator[Batch]:
    """The response batches of several requests as they come, tagged with the request's index. At most
    ``in_flight`` requests run at a time: the next starts when one ends, behind what other clients
    submitted meanwhile. Closing this iterator closes every request's (each is aborted upstream if
    unfinished)."""
    if len(requests) == 1:
        async with aclosing(core.generate(requests[0])) as gen:
            async for batch in gen:
                yield 0, batch
        return
    queue: asyncio.Queue = asyncio.Queue()
    slots = asyncio.Semaphore(max(in_flight, 1))

    async def pump(i: int, request: generation_pb2.GenerateRequest) -> None:
        try:
            async with slots, aclosing(core.generate(request)) as gen:
                async for batch in gen:
                    queue.put_nowait((i, batch))
        except GenerationFailed as exc:
            queue.put_nowait((i, exc))
            return
        queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
    try:
        for _ in tasks:
            while True:
                i, item = await queue.get()
                if item is None:
                    break
                if isinstance(item, GenerationFailed):
                    raise item
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Shape:
    """How one endpoint spells choices, whole and as stream chunks."""

    object_whole = object_chunk = ""

    def __init__(self, fmt: LogprobFormat, logprobs: bool) -> None:
        self.fmt, self.logprobs = fmt, logprobs

    def prepare(self, resp: generation_pb2.GenerateResponse) -> None:
        """Adjusts a response before it is counted and shaped (echo without generation drops the token)."""

    def absorb(self, resp: generation_pb2.GenerateResponse, c: Choice, index: int = 0) -> None:
        c.text.append(resp.text)
        if self.logprobs:
            c.logprobs.append(self._logprobs(resp, c))
        c.finish_reason = finish_reason(resp.finish_reason) or c.finish_reason

    def _logprobs(self, resp, c: Choice):
        raise NotImplementedError

    def whole(self, index: int, c: Choice) -> dict:
        raise NotImplementedError

    def chunks(self, index: int, resp: generation_pb2.GenerateResponse, c: Choice) -> list[dict]:
        raise NotImplementedError


class _CompletionShape(_Shape):
    object_whole = object_chunk = "text_completion"

    def _logprobs(self, resp, c: Choice) -> dict:
        return self.fmt.completion_body(resp.logprobs, c)

    def whole(self, index: int, c: Choice) -> dict:
        return {"index": index, "text": "".join(c.text), "finish_reason": c.finish_reason,
                "logprobs": self.fmt.merge_completion(c.logprobs) if self.logprobs else None}

    def chunks(self, index: int, resp, c: Choice) -> list[dict]:
        reason = finish_reason(resp.finish_reason)
        if not (resp.text or resp.logprobs or reason):
            return []
        return [{"index": index, "text": resp.text, "finish_reason": reason,
                 "logprobs": self._logprobs(resp, c) if self.logprobs else None}]


class _ChatShape(_Shape):
    object_whole, object_chunk = "chat.completion", "chat.completion.chunk"
    echo = ""  # vLLM's chat echo: the last (assistant) message's content opens every choice

    def _logprobs(self, resp, c: Choice) -> list[dict]:
        return self.fmt.chat_entries(resp.logprobs)

    def whole(self, index: int, c: Choice) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": self.echo + "".join(c.text)},
                "logprobs": {"content": [e for part in c.logprobs for e in part]} if self.logprobs else None,
                "finish_reason": c.finish_reason}

    def chunks(self, index: int, resp, c: Choice) -> list[dict]:
        out = []
        if not c.started:  # a choice opens with the assistant's role, as OpenAI's streams do
            c.started = True
            out.append({"index": index, "delta": {"role": "assistant", "content": self.echo}, "logprobs": None,
                        "finish_reason": None})
        reason = finish_reason(resp.finish_reason)
        if resp.text or resp.logprobs or reason:
            out.append({"index": index, "delta": {"content": resp.text} if resp.text else {},
                        "logprobs": {"content": self._logprobs(resp, c)} if self.logprobs else None,
                        "finish_reason": reason})
        return out


class _ToolChatShape(ToolCallsShape, _ChatShape):
    pass


def _sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _error_response(exc: ApiError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status)


_HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def _token_check(token: str):
    expected = token.encode()

    @web.middleware
    async def check(request: web.Request, handler) -> web.StreamResponse:
        """401 in OpenAI's shape without the gateway's bearer token; /health and /ping stay open, as gRPC health."""
        if request.path not in ("/health", "/ping"):
            given = request.headers.get("Authorization")
            if given is None:
                raise ApiError(401, "missing credentials: send 'Authorization: Bearer <token>'", None,
                               "invalid_api_key", "authentication_error")
            if not bearer_matches(given, expected):
                raise ApiError(401, "invalid credentials", None, "invalid_api_key", "authentication_error")
        return await handler(request)

    return check


@web.middleware
async def _errors(request: web.Request, handler) -> web.StreamResponse:
    """Every failure in OpenAI's error shape: ours, aiohttp's (unknown route, method, body too large), bugs."""
    try:
        return await handler(request)
    except ApiError as exc:
        return _error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = {404: f"no such route: {request.method} {request.path}",
                   405: f"method {request.method} is not allowed on {request.path}",
                   413: "body: the request body is too large"}.get(exc.status, exc.reason)
        return _error_response(ApiError(exc.status, message, None, _HTTP_ERROR_CODES.get(exc.status)))
    except ConnectionError:  # the client went away while we wrote: nobody to answer
        raise
    except Exception as exc:  # a bug: the client still gets an answer in the expected shape
        log.get_logger().exception("http handler failed", path=request.path)
        return _error_response(ApiError(500, f"internal error: {type(exc).__name__}", None, "internal"))


class OpenAIServer:
    """The HTTP front end of one gateway process."""

    def __init__(self, core: GenerationCore, chat: ChatPrompts, token: str | None = None,
                 limits: HttpLimits | None = None, tool_call_parser: str | None = None) -> None:
        """``token``: the gateway's bearer token (--auth-token-file); every route but /health then needs
        ``Authorization: Bearer <token>``, as the gRPC API does (and as OpenAI clients send their key).
        ``limits``: the port's timeouts and caps (http_limits.py); bodies are bounded by the gateway's
        --max-request-bytes, as gRPC messages are."""
        self.core, self.chat = core, chat
        self.limits = limits or HttpLimits()
        self.max_body_bytes = core.gateway_limits.max_request_bytes
        self.guard = ConnectionGuard(self.limits)
        self.tool_call_parser = tool_call_parser  # None: from the chat template (tool_parsers.py)
        self.created = int(time.time())
        # One token's text, for logprobs (up to 21 a token with top_logprobs): decoded once per token id.
        self._token_text = functools.lru_cache(maxsize=65536)(self._decode_one)
        middlewares = [self.guard.middleware(), _errors] + ([_token_check(token)] if token else [])
        self.app = web.Application(middlewares=middlewares, client_max_size=self.max_body_bytes)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/v1/models/{model:.+}", self.model)
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_post("/v1/chat/completions", self.chat_completions)
        self.app.router.add_get("/health", self.health)
        add_routes(self)  # /ping, /version, /tokenize, /detokenize, /metrics
        self.runner: web.AppRunner | None = None

    async def start(self, host: str, port: int, ssl_context=None, reuse_port: bool = False) -> int:
        """Listens on host:port (0 picks a free port), with TLS when ``ssl_context`` is given and shared
        with the other gateways of `serve --gateways N` with ``reuse_port``; returns the port."""
        self.runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0,
                                    keepalive_timeout=self.limits.http_idle_timeout, logger=client_error_logger())
        await self.runner.setup()
        await GuardedSite(self.runner, host, port, self.guard, ssl_context, reuse_port).start()
        return self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    # ---- routes

    def _model_card(self) -> dict:
        card = {"id": self.core.model_name, "object": "model", "created": self.created, "owned_by": "pagedserve"}
        if self.core.info is not None:
            card["max_model_len"] = self.core.info.max_model_len
        return card

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        self._check_model(request.match_info["model"])
        return web.json_response(self._model_card())

    async def health(self, request: web.Request) -> web.Response:
        ok = self.core.info is not None and self.core.engines.connected and not self.core.draining
        return web.json_response({"status": "ok" if ok else "unavailable"}, status=200 if ok else 503)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        check_fields(body, "completions")
        model = self._check_model(body.get("model"))
        check_completion_extras(body)
        if self.core.info is not None:  # else: UNAVAILABLE, below
            check_prompt_count(body.get("prompt"), self.core.info.max_model_len, self.limits)
        prompts = completion_prompts(body)
        logprobs = int_param(body, "logprobs", 0, MAX_TOP_LOGPROBS)
        max_tokens = max_tokens_of(body)
        echo = bool_param(body, "echo")
        prompt_only = generation_free(body, max_tokens, echo)  # max_tokens 0: generate one, return none
        params = sampling_params(body, 1 if prompt_only else DEFAULT_COMPLETION_MAX_TOKENS if max_tokens is None
                                 else max_tokens, logprobs is not None, logprobs or 0)
        engine_params(body, params)
        vllm_k = params.prompt_logprobs if params.HasField("prompt_logprobs") else None
        if echo and logprobs is not None:  # the echoed prompt's tokens come with their logprobs
            params.prompt_logprobs = max(logprobs, vllm_k or 0)
        vllm_sampling(body, params)
        check_sequences(len(prompts), params.n if params.HasField("n") else 1, self.limits)
        response_id = f"cmpl-{uuid.uuid4().hex}"
        requests = []
        for i, prompt in enumerate(prompts):
            req = generation_pb2.GenerateRequest(
                request_id=response_id if len(prompts) == 1 else f"{response_id}-{i}", model=model,
                sampling_params=params)
            if isinstance(prompt, str):
                req.text = prompt
            else:
                req.token_ids.ids.extend(_token_ids(prompt))
            requests.append(req)
        renames = {"text": "prompt", "token_ids.ids": "prompt", "sampling_params.top_logprobs": "logprobs",
                   "sampling_params.logprobs": "logprobs"}
        fmt = LogprobFormat(self._token_text, chat=False)
        if echo or params.HasField("prompt_logprobs") or prompt_only:
            echoed = await self._echoed_prompts(requests, prompts, renames) if echo else []
            shape = EchoShape(fmt, logprobs, echoed, requests[0].sampling_params.n or 1, prompt_only, vllm_k)
        else:
            shape = _CompletionShape(fmt, logprobs is not None)
        return await self._respond(request, response_id, requests, stream_options(body), renames, shape)

    async def _echoed_prompts(self, requests, prompts, renames) -> list[tuple[str, list[int]]]:
        """(text, token ids) of each prompt, for echo: text prompts tokenized here, once (the request then
        carries the ids)."""
        out = []
        for req, prompt in zip(requests, prompts, strict=True):
            if isinstance(prompt, str):
                try:
                    ids = (await self.core.validate(req)).prompt_token_ids
                except GenerationFailed as exc:
                    raise ApiError.from_failure(exc, renames) from None
                req.token_ids.ids.extend(ids)
                out.append((prompt, ids))
            else:
                out.append((self.core.tokenizer.decode(list(prompt), skip_special_tokens=False), list(prompt)))
        return out

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        check_fields(body, "chat")
        model = self._check_model(body.get("model"))
        messages = chat_messages(body)
        render = chat_render_options(body)
        logprobs = bool_param(body, "logprobs")
        top_logprobs = int_param(body, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
        if top_logprobs and not logprobs:
            raise ApiError.invalid("top_logprobs", "needs logprobs set to true")
        max_tokens = max_tokens_of(body)
        template = self.chat.template
        tool_request = parse_tool_request(body, template.source if template else None, self.tool_call_parser)
        params = sampling_params({k: v for k, v in body.items() if k not in TOOL_FIELDS}, max_tokens, logprobs,
                                 top_logprobs)  # unset max_tokens: the context's end
        if body.get("prompt_logprobs") is not None:
            raise ApiError.invalid("prompt_logprobs", "is supported on /v1/completions only")
        engine_params(body, params)
        vllm_sampling(body, params)
        if tool_request is not None and (schema := tool_request.constraint_schema()) is not None:
            if params.WhichOneof("constraint"):
                raise ApiError.invalid("tool_choice", "cannot be required or a named function together with an "
                                       "output constraint (response_format, structured_outputs, guided_*)")
            params.json_schema = json.dumps(schema)
        options = stream_options(body)  # checked before the template renders
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        renames = {"sampling_params.max_tokens": "max_completion_tokens" if "max_completion_tokens" in body
                   else "max_tokens", "token_ids.ids": "messages", "prompt": "messages"}
        try:
            req = await self.chat.request(response_id, model, messages, params,
                                          tools=tool_request.tools if tool_request else None, **render)
        except GenerationFailed as exc:
            raise ApiError.from_failure(exc, renames) from None
        fmt = LogprobFormat(self._token_text, chat=True)
        shape = _ChatShape(fmt, logprobs) if tool_request is None else _ToolChatShape(fmt, logprobs)
        if tool_request is not None:
            shape.tool_request = tool_request
        shape.echo = chat_echo(body, messages)
        return await self._respond(request, response_id, [req], options, renames, shape)

    # ---- helpers

    async def _body(self, request: web.Request) -> dict:
        return await read_json(request, self.max_body_bytes, self.limits.http_body_timeout)

    def _check_model(self, model) -> str:
        if model is None or model == "":
            return ""
        if not isinstance(model, str):
            raise ApiError.invalid("model", "must be a string")
        if model != self.core.model_name:
            raise ApiError(404, f"The model {shown(model)} does not exist; this server serves "
                           f"`{self.core.model_name}`.",
                           "model", "model_not_found")
        return model

    def _decode_one(self, token_id: int) -> str:
        return self.core.tokenizer.decode([token_id], skip_special_tokens=False)

    async def _respond(self, request: web.Request, response_id: str, requests: list[generation_pb2.GenerateRequest],
                       options: StreamOptions, renames: dict[str, str], shape: _Shape) -> web.StreamResponse:
        """Runs the requests; a failure before the first response is an HTTP error of its own."""
        p = requests[0].sampling_params
        n = max(p.n or 1, p.beam_width or 1)  # choices per prompt: samples or beams
        prompt_tokens: list[int] = []  # per prompt, known up front when every chunk reports usage
        try:
            # No prompt starts unless all are valid; continuous usage needs the prompts' lengths first.
            for req in requests if len(requests) > 1 or options.continuous_usage_stats else ():
                valid = await self.core.validate(req)
                prompt_tokens.append(len(valid.prompt_token_ids))
                if req.WhichOneof("prompt") == "text":  # tokenized once: generate takes the ids
                    req.token_ids.ids.extend(valid.prompt_token_ids)
            stream = responses(self.core, requests, max(self.limits.sequences_in_flight_per_request // n, 1))
            async with aclosing(stream):
                first = await anext(stream, None)
                envelope = {"id": response_id, "created": int(time.time()), "model": self.core.model_name}
                if options.stream:
                    return await self._sse(request, envelope, stream, first, n, options, renames, shape,
                                           prompt_tokens)
                return await self._whole(envelope, stream, first, n, shape)
        except GenerationFailed as exc:
            raise ApiError.from_failure(exc, renames) from None

    async def _whole(self, envelope: dict, stream, batch: Batch | None, n: int, shape: _Shape) -> web.Response:
        choices: dict[int, Choice] = {}
        usage = Usage()
        while batch is not None:
            prompt_index, batch_responses = batch
            for resp in batch_responses:
                shape.prepare(resp)
                usage.add(prompt_index, resp)
                index = prompt_index * n + resp.index
                shape.absorb(resp, choices.setdefault(index, Choice()), index)
            batch = await anext(stream, None)
        body = dict(envelope, object=shape.object_whole, choices=[shape.whole(i, choices[i]) for i in sorted(choices)],
                    usage=usage.body(), system_fingerprint=None)
        return web.json_response(body, dumps=lambda x: json.dumps(x, ensure_ascii=False))

    async def _sse(self, request: web.Request, envelope: dict, stream, batch: Batch | None, n: int,
                   options: StreamOptions, renames: dict[str, str], shape: _Shape,
                   prompt_tokens: list[int]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        envelope = dict(envelope, object=shape.object_chunk, system_fingerprint=None)
        if options.include_usage:
            envelope["usage"] = None
        choices: dict[int, Choice] = {}
        usage = Usage()
        running = _RunningUsage(sum(prompt_tokens)) if options.continuous_usage_stats else None
        try:
            while batch is not None:
                prompt_index, batch_responses = batch
                events = []
                for r in batch_responses:
                    shape.prepare(r)
                    usage.add(prompt_index, r)
                    index = prompt_index * n + r.index
                    chunk = envelope if running is None else dict(envelope, usage=running.add(r))
                    events += [_sse(dict(chunk, choices=[c]))
                               for c in shape.chunks(index, r, choices.setdefault(index, Choice()))]
                await resp.write(b"".join(events))
                batch = await anext(stream, None)
        except GenerationFailed as exc:  # the status line is gone: the error is the stream's last event
            await resp.write(_sse(ApiError.from_failure(exc, renames).body()))
        else:
            if options.include_usage:
                await resp.write(_sse(dict(envelope, choices=[], usage=usage.body())))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


class _RunningUsage:
    """stream_options.continuous_usage_stats: the usage so far, for every chunk (vLLM's shape)."""

    def __init__(self, prompt_tokens: int) -> None:
        self.prompt_tokens, self.completion_tokens = prompt_tokens, 0

    def add(self, resp: generation_pb2.GenerateResponse) -> dict:
        self.completion_tokens += len(resp.token_ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def _token_ids(ids: list[int]) -> list[int]:
    """Token ids as the proto holds them (uint32); range against the vocabulary is validation's."""
    bad = next((t for t in ids if not 0 <= t < 2**32), None)
    if bad is not None:
        raise ApiError.invalid("prompt", f"token id {bad} is outside the vocabulary")
    return ids
