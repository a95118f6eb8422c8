"""The routes that operators and tools probe beside the OpenAI API, in vLLM's shapes: /ping (SageMaker's
liveness probe, as /health), /version, /tokenize and /detokenize, and /metrics (the gateway's Prometheus
metrics on the API port too: aiperf and others scrape the API port by default)."""

from __future__ import annotations

from dataclasses import replace
from importlib import metadata

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gpu_worker.sampling_params import InvalidField
from scheduler_svc import metrics
from scheduler_svc.gateway.generation import GenerationFailed
from scheduler_svc.gateway.openai_params import chat_render_options
from scheduler_svc.gateway.openai_protocol import ApiError, bool_param, chat_messages
from scheduler_svc.gateway.validation import check_text

FALLBACK_VERSION = "0.1.0"  # pyproject's, for a checkout that is not installed


def version() -> str:
    try:
        return metadata.version("pagedserve")
    except metadata.PackageNotFoundError:
        return FALLBACK_VERSION


def add_routes(server) -> None:
    """Adds the probe routes to an OpenAIServer's app."""
    routes = _Routes(server)
    router = server.app.router
    router.add_get("/ping", routes.ping)
    router.add_post("/ping", routes.ping)
    router.add_get("/version", routes.version)
    router.add_post("/tokenize", routes.tokenize)
    router.add_post("/detokenize", routes.detokenize)
    router.add_get("/metrics", routes.metrics)


class _Routes:
    def __init__(self, server) -> None:
        self.server = server
        self.core = server.core

    async def ping(self, request: web.Request) -> web.Response:
        return await self.server.health(request)

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": version()})

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(metrics.registry())
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def tokenize(self, request: web.Request) -> web.Response:
        """vLLM's /tokenize: a ``prompt`` (special tokens added unless add_special_tokens is false) or chat
        ``messages`` (rendered by the chat template; add_generation_prompt, continue_final_message)."""
        body = await self.server._body(request)
        self.server._check_model(body.get("model"))
        unknown = sorted(set(body) - {"model", "prompt", "messages", "add_special_tokens", "return_token_strs",
                                      "add_generation_prompt", "continue_final_message"})
        if unknown:
            raise ApiError.invalid(unknown[0], "is not a parameter of /tokenize on this server")
        try:
            if "messages" in body:
                text = self.server.chat.render(chat_messages(body), **chat_render_options(body))
                add_special = body.get("add_special_tokens") is True  # the template spells them out
            else:
                text = body.get("prompt")
                if not isinstance(text, str):
                    raise ApiError.invalid("prompt", "must be a string (or send messages)")
                add_special = body.get("add_special_tokens") is not False
            limits = self.core.limits  # UNAVAILABLE until the engine is ready
            if text:  # bounded by the gateway's prompt size only: counting a long text is the point
                check_text(text, replace(limits, max_token_bytes=None), "prompt")
            ids = await self.core.encode(text, add_special_tokens=add_special) if text else []
        except InvalidField as exc:
            raise ApiError.invalid(exc.field, str(exc)[len(exc.field) + 2:]) from None
        except GenerationFailed as exc:
            raise ApiError.from_failure(exc, {}) from None
        out = {"count": len(ids), "max_model_len": limits.max_model_len, "tokens": ids, "token_strs": None}
        if bool_param(body, "return_token_strs"):
            out["token_strs"] = [self.core.tokenizer.id_to_token(t) for t in ids]
        return web.json_response(out)

    async def detokenize(self, request: web.Request) -> web.Response:
        """vLLM's /detokenize: ``tokens`` (ids) to ``prompt`` (text)."""
        body = await self.server._body(request)
        self.server._check_model(body.get("model"))
        tokens = body.get("tokens")
        vocab = self.core.tokenizer.vocab_size
        if not (isinstance(tokens, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in tokens)):
            raise ApiError.invalid("tokens", "must be a list of token ids")
        bad = next((t for t in tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError.invalid("tokens", f"token id {bad} is outside the vocabulary [0, {vocab})")
        return web.json_response({"prompt": self.core.tokenizer.decode(tokens)})
