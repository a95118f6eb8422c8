"""The context window a request must fit, and how an overflow is told to clients.

A request's prompt plus its completion must fit the served context (``max_model_len``). When they do
not, the message is vLLM's, word for word, because clients recognise it: litellm maps any error whose
text holds "This model's maximum context length is" to ``ContextWindowExceededError``, LangChain maps
the code ``context_length_exceeded`` (the HTTP front end's code for these errors) to its context
overflow error, and scripts written against OpenAI match the same sentence. The messages name tokens
only, never the server's memory layout.

``max_tokens`` left unset means "until the context ends". For n > 1 samples or beams, whose sequences
share the KV pool, it also stops where the samples together would fill the pool on an empty engine,
so a request that could run alone is always admitted (it is then preempted like any other when
others need the room).
"""

from __future__ import annotations

from dataclasses import replace

from gpu_worker.sampling_params import InvalidField, SamplingParams

CONTEXT_ERROR_MARK = "This model's maximum context length is"  # what litellm and scripts match


def prompt_too_long(num_prompt_tokens: int, max_model_len: int) -> str:
    """vLLM's message for a prompt that leaves no room to generate."""
    return (f"{CONTEXT_ERROR_MARK} {max_model_len} tokens. However, you requested {num_prompt_tokens} tokens "
            "in the messages, Please reduce the length of the messages.")


def request_too_long(num_prompt_tokens: int, max_tokens: int, max_model_len: int) -> str:
    """vLLM's message for a prompt plus max_tokens over the context."""
    return (f"{CONTEXT_ERROR_MARK} {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the messages, {max_tokens} in the "
            "completion). Please reduce the length of the messages or completion.")


def is_context_error(message: str) -> bool:
    return CONTEXT_ERROR_MARK in message


def check_prompt_fits(num_prompt_tokens: int, max_model_len: int, name: str) -> None:
    """Raises InvalidField(name) when the prompt leaves no room for one generated token."""
    if num_prompt_tokens >= max_model_len:
        raise InvalidField(name, prompt_too_long(num_prompt_tokens, max_model_len))


def group_fit_tokens(num_prompt_tokens: int, group: int, num_blocks: int, block_size: int) -> int:
    """The most tokens (prompt included) each of ``group`` sequences can reach when they run alone on
    an empty pool of ``num_blocks``: each holds its own blocks past the shared prompt[:-1]."""
    shared = (num_prompt_tokens - 1) // block_size
    own_blocks = (num_blocks - shared) // group + shared  # blocks per sequence, the shared ones counted
    return own_blocks * block_size


def resolve_max_tokens(params: SamplingParams, explicit: bool, num_prompt_tokens: int, max_model_len: int,
                       num_blocks: int = 0, block_size: int = 0) -> SamplingParams:
    """``params`` with max_tokens checked (explicit) or resolved (unset). ``num_blocks`` and
    ``block_size`` describe the engine's pool (0: unknown; the context alone bounds)."""
    room = max_model_len - num_prompt_tokens
    if explicit:
        if params.max_tokens > room:
            raise InvalidField("max_tokens", request_too_long(num_prompt_tokens, params.max_tokens, max_model_len))
        return params
    limit = room
    group = max(params.n, params.beam_width)
    if group > 1 and num_blocks and block_size:
        limit = min(limit, group_fit_tokens(num_prompt_tokens, group, num_blocks, block_size) - num_prompt_tokens)
    return replace(params, max_tokens=max(limit, 1))
