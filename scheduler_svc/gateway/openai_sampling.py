"""The engine-level sampling parameters of the OpenAI-compatible API (min_tokens, presence_penalty,
frequency_penalty, logit_bias, prompt_logprobs) and what prompt log probabilities look like there:
``echo`` with ``logprobs`` on /v1/completions (OpenAI's shape: the prompt's tokens lead the choice's
logprobs, the first one ``null``), and vLLM's ``prompt_logprobs`` list.

``max_tokens: 0`` is vLLM's "echo without generation": the engine generates one token, which the
response leaves out (it is allowed only with ``echo`` or ``prompt_logprobs``).
"""

from __future__ import annotations

from collections.abc import Callable

import clients  # noqa: F401
from gpu_worker.sampling_params import MAX_LOGIT_BIAS_ENTRIES, MAX_TOP_LOGPROBS
from pagedserve.v1 import generation_pb2
from scheduler_svc.gateway.openai_protocol import ApiError, _finite, float_param, int_param
from scheduler_svc.gateway.openai_protocol import finish_reason as _reason


def engine_params(body: dict, p: generation_pb2.SamplingParams) -> None:
    """Sets min_tokens, the penalties, logit_bias and prompt_logprobs of the body on ``p`` (ranges are
    the engine's to check: its message names the parameter)."""
    if (min_tokens := int_param(body, "min_tokens")) is not None:
        p.min_tokens = min_tokens
    for name in ("presence_penalty", "frequency_penalty"):
        setattr(p, name, float_param(body, name) or 0.0)
    p.logit_bias.extend(_logit_bias(body))
    if (k := int_param(body, "prompt_logprobs", 0, MAX_TOP_LOGPROBS)) is not None:
        p.prompt_logprobs = k


def _logit_bias(body: dict) -> list[generation_pb2.LogitBias]:
    """OpenAI's {"token id": bias} (JSON keys are strings)."""
    bias = body.get("logit_bias")
    if bias is None:
        return []
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise ApiError.invalid("logit_bias", f"must be an object of at most {MAX_LOGIT_BIAS_ENTRIES} token ids "
                               "to biases")
    out = []
    for key, value in bias.items():
        try:
            token_id = int(key)
        except ValueError:
            raise ApiError.invalid("logit_bias", f"keys must be token ids, got {key!r}") from None
        if not 0 <= token_id < 2**32:
            raise ApiError.invalid("logit_bias", f"token id {token_id} is outside the vocabulary")
        value = float_param({"logit_bias": value}, "logit_bias")
        if value is None or not -100 <= value <= 100:
            raise ApiError.invalid("logit_bias", f"bias of token {token_id} must be a number in [-100, 100]")
        out.append(generation_pb2.LogitBias(token_id=token_id, bias=value))
    return out


def generation_free(body: dict, max_tokens: int | None, echo: bool) -> bool:
    """Whether ``max_tokens: 0`` asks for the prompt only (echo or prompt_logprobs); 0 otherwise is 400."""
    if max_tokens != 0:
        return False
    if not (echo or body.get("prompt_logprobs") is not None):
        raise ApiError.invalid("max_tokens", "must be at least 1 (0 is allowed only with echo or prompt_logprobs)")
    return True


def vllm_prompt_logprobs(logprobs, token_text: Callable[[int], str]) -> list[dict | None]:
    """vLLM's prompt_logprobs: None for the first prompt token, then per token {"id": {logprob, rank,
    decoded_token}} holding the prompt token and its alternatives."""
    out: list[dict | None] = [None]
    for lp in logprobs:
        entry = {str(t.token_id): {"logprob": t.logprob, "rank": r + 1, "decoded_token": token_text(t.token_id)}
                 for r, t in enumerate(lp.top)}
        entry[str(lp.token_id)] = {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": token_text(lp.token_id)}
        out.append(entry)
    return out


def echo_logprobs(first_token_id: int, logprobs, token_text: Callable[[int], str], finite) -> dict:
    """OpenAI's completion logprobs of an echoed prompt: the first token's logprob and alternatives are
    null; ``first_token_id``: the prompt's first token; text_offset counts from the prompt's start."""
    tokens = [token_text(first_token_id)] + [token_text(lp.token_id) for lp in logprobs]
    offsets, offset = [], 0
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [None] + [finite(lp.logprob) for lp in logprobs],
            "top_logprobs": [None] + [{token_text(t.token_id): finite(t.logprob) for t in lp.top} for lp in logprobs],
            "text_offset": offsets}


class EchoShape:
    """/v1/completions choices with prompt-side extras: ``echo`` (the prompt's text, and with
    ``logprobs`` its tokens' logprobs, lead the choice), vLLM's ``prompt_logprobs`` list, and
    ``max_tokens: 0`` (the one generated token is dropped: text, logprobs and usage)."""

    object_whole = object_chunk = "text_completion"

    def __init__(self, fmt, logprobs: int | None, echoed: list[tuple[str, list[int]]], n: int,
                 prompt_only: bool, vllm_k: int | None) -> None:
        """``echoed``: (text, token ids) per prompt when echo is on, else empty; ``logprobs``: the
        request's logprobs (None: none); ``vllm_k``: its prompt_logprobs (None: not asked)."""
        self.fmt, self.logprobs, self.echoed, self.n = fmt, logprobs, echoed, n
        self.prompt_only, self.vllm_k = prompt_only, vllm_k
        self.prompt_lps: dict[int, list] = {}  # choice index -> the prompt's TokenLogprobs

    def prepare(self, resp: generation_pb2.GenerateResponse) -> None:
        if self.prompt_only:
            del resp.token_ids[:], resp.logprobs[:]
            resp.text = ""
            if resp.HasField("usage"):
                resp.usage.completion_tokens = 0

    def _opening(self, index: int, resp, c) -> tuple[str, dict | None, list | None]:
        """The first response of a choice: (echoed text, echoed logprobs body, vLLM prompt_logprobs)."""
        lps = list(resp.prompt_logprobs)
        text, body, vllm = "", None, None
        if self.echoed:
            text, ids = self.echoed[index // self.n]
            if self.logprobs is not None:
                trimmed = [_top_trimmed(lp, self.logprobs) for lp in lps]
                body = echo_logprobs(ids[0], trimmed, self.fmt.token_text, _finite)
                c.text_offset = sum(len(t) for t in body["tokens"])
        if self.vllm_k is not None:
            vllm = vllm_prompt_logprobs([_top_trimmed(lp, self.vllm_k) for lp in lps], self.fmt.token_text)
        c.started = True
        return text, body, vllm

    def absorb(self, resp, c, index: int = 0) -> None:
        if not c.started:
            text, body, vllm = self._opening(index, resp, c)
            c.text.append(text)
            if body is not None:
                c.logprobs.append(body)
            if vllm is not None:
                self.prompt_lps[index] = vllm
        c.text.append(resp.text)
        if self.logprobs is not None:
            c.logprobs.append(self.fmt.completion_body(resp.logprobs, c))
        c.finish_reason = _reason(resp.finish_reason) or c.finish_reason

    def whole(self, index: int, c) -> dict:
        out = {"index": index, "text": "".join(c.text), "finish_reason": c.finish_reason,
               "logprobs": self.fmt.merge_completion(c.logprobs) if self.logprobs is not None else None}
        if self.vllm_k is not None:
            out["prompt_logprobs"] = self.prompt_lps.get(index)
        return out

    def chunks(self, index: int, resp, c) -> list[dict]:
        reason = _reason(resp.finish_reason)
        text, body, vllm = ("", None, None) if c.started else self._opening(index, resp, c)
        text += resp.text
        parts = [body] if body is not None else []
        if self.logprobs is not None:
            parts.append(self.fmt.completion_body(resp.logprobs, c))
        if not (text or parts and any(p["tokens"] for p in parts) or reason or vllm is not None):
            return []
        chunk = {"index": index, "text": text, "finish_reason": reason,
                 "logprobs": self.fmt.merge_completion(parts) if self.logprobs is not None else None}
        if vllm is not None:
            chunk["prompt_logprobs"] = vllm
        return [chunk]


def _top_trimmed(lp: generation_pb2.TokenLogprob, k: int) -> generation_pb2.TokenLogprob:
    """``lp`` with at most k alternatives (the engine returned the larger of echo's and vLLM's k)."""
    if len(lp.top) <= k:
        return lp
    out = generation_pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, rank=lp.rank)
    out.top.extend(lp.top[:k])
    return out
