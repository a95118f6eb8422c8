"""The bad-input cases of docs/ERRORS.md, one table for the document and the test that runs them.

Each case is a call to a running service (see SERVICE_FLAGS) and the answer it must get: the status
code, the message (``…`` stands for a part that depends on the input or the tokenizer) and, for
INVALID_ARGUMENT, the field named in the google.rpc.BadRequest detail. ``python -m tests.e2e.bad_inputs``
prints the table; tests/e2e/test_bad_inputs.py checks that docs/ERRORS.md holds it and runs every case.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import clients  # noqa: F401

# isort: split
from pagedserve.v1 import generation_pb2

MODEL = "llama"  # the checkpoint directory's name, which the gateway serves under
CONTEXT_LEN = 2048
BLOCK_BYTES = 12288  # the demo llama's KV block: 3 layers x K,V x 16 tokens x 2 heads x 16 x 4 bytes
NUM_BLOCKS = 64  # a pool of 1024 tokens, shorter than the context
# The service the cases run against: one sequence at a time and two may wait (the queue case fills it).
# The HTTP port's header and body timeouts are short for the cases that wait for them.
SERVICE_FLAGS = ("--kv-cache-memory", str(NUM_BLOCKS * BLOCK_BYTES), "--swap-space", "0.01", "--max-num-seqs", "1",
                 "--max-num-waiting", "2", "--http-port", "0", "--http-header-timeout", "1", "--http-body-timeout", "1")
TOKEN_FLAGS = ("--kv-cache-memory", "4MiB", "--swap-space", "0.01", "--http-port", "0")  # with --auth-token-file
BAD_UTF8 = b"\xff\xfe"


@dataclass(frozen=True)
class Case:
    """One bad input. ``request``: the GenerateRequest's fields (or raw bytes, or a TokenizeRequest's
    fields for rpc="Tokenize"); ``setup`` names a case that needs more than one call."""

    name: str
    code: str
    message: str
    field: str = ""
    request: dict | bytes | None = None
    rpc: str = "Generate"
    setup: str = ""
    service: str = "plain"  # "token": the service with --auth-token-file

    def parts(self) -> list[str]:
        return [p for p in self.message.split("…") if p]


def params(**kw) -> dict:
    return {"text": "hello", "sampling_params": {"max_tokens": 4, **kw}}


def raw(**fields) -> bytes:
    """A GenerateRequest's encoding with every string value b"BAD" replaced by invalid UTF-8."""
    return generation_pb2.GenerateRequest(**fields).SerializeToString().replace(b"BAD", BAD_UTF8 + b"!")


INVALID = "INVALID_ARGUMENT"
CASES = [
    # ---- the prompt
    Case("no prompt", INVALID, "prompt: set either text or token_ids", "prompt",
         {"sampling_params": {"max_tokens": 4}}),
    Case("empty text", INVALID, "text: must not be empty", "text", {"text": "", "sampling_params": {"max_tokens": 4}}),
    Case("empty token ids", INVALID, "token_ids.ids: must not be empty", "token_ids.ids",
         {"token_ids": {"ids": []}, "sampling_params": {"max_tokens": 4}}),
    Case("token id outside the vocabulary", INVALID,
         "token_ids.ids: ids[1] = 1000 is outside the vocabulary [0, 1000)", "token_ids.ids",
         {"token_ids": {"ids": [5, 1000]}, "sampling_params": {"max_tokens": 4}}),
    Case("token ids longer than the context", INVALID, "token_ids.ids: This model's maximum context length is 1024 "
         "tokens. However, you requested 2100 tokens in the messages, Please reduce the length of the messages.",
         "token_ids.ids", {"token_ids": {"ids": [5] * 2100}, "sampling_params": {"max_tokens": 4}}),
    Case("text longer than the context, in tokens", INVALID, "text: This model's maximum context length is 1024 "
         "tokens. However, you requested … tokens in the messages, Please reduce the length of the messages.", "text",
         {"text": "hello " * 1200, "sampling_params": {"max_tokens": 4}}),
    Case("text longer than any prompt that fits (500 KB), never tokenized", INVALID,
         "text: is 500000 bytes long; the limit is … bytes (more than a context of 1024 tokens can hold)", "text",
         {"text": "x" * 500_000, "sampling_params": {"max_tokens": 4}}),
    Case("10 MB request (limit 4 MiB)", "RESOURCE_EXHAUSTED", "Received message larger than max (… vs. 4194304)",
         request=generation_pb2.GenerateRequest(text="x" * 10_000_000).SerializeToString()),
    Case("64 MB request", "RESOURCE_EXHAUSTED", "Received message larger than max (… vs. 4194304)",
         request=generation_pb2.GenerateRequest(text="x" * 64_000_000).SerializeToString()),
    Case("prompt plus max_tokens over the context", INVALID, "sampling_params.max_tokens: This model's maximum "
         "context length is 1024 tokens. However, you requested 1510 tokens (10 in the messages, 1500 in the "
         "completion). Please reduce the length of the messages or completion.", "sampling_params.max_tokens",
         {"token_ids": {"ids": [5] * 10}, "sampling_params": {"max_tokens": 1500}}),
    # ---- messages that do not parse
    Case("text not valid UTF-8", INVALID, "text: is not valid UTF-8", "text", raw(text="BAD")),
    Case("stop string not valid UTF-8", INVALID, "sampling_params.stop: is not valid UTF-8", "sampling_params.stop",
         raw(text="hi", sampling_params={"max_tokens": 4, "stop": ["BAD"]})),
    Case("model name not valid UTF-8", INVALID, "model: is not valid UTF-8", "model", raw(model="BAD", text="hi")),
    Case("truncated message", INVALID, "the request is not a valid pagedserve.v1.GenerateRequest message (corrupt "
         "or truncated encoding)", request=b"\x1a\xff\xff\xff\xff\x0f"),
    Case("invalid wire type", INVALID, "the request is not a valid pagedserve.v1.GenerateRequest message (corrupt "
         "or truncated encoding)", request=b"\x0f\x01"),
    # ---- sampling parameters
    Case("max_tokens 0", INVALID, "sampling_params.max_tokens: must be an integer >= 1, got 0",
         "sampling_params.max_tokens", params(max_tokens=0)),
    Case("negative temperature", INVALID, "sampling_params.temperature: must be >= 0, got -1.0",
         "sampling_params.temperature", params(temperature=-1.0)),
    Case("temperature NaN", INVALID, "sampling_params.temperature: must be a finite number, got nan",
         "sampling_params.temperature", params(temperature=math.nan)),
    Case("temperature infinite", INVALID, "sampling_params.temperature: must be a finite number, got inf",
         "sampling_params.temperature", params(temperature=math.inf)),
    Case("top_p 0", INVALID, "sampling_params.top_p: must be in (0, 1], got 0.0", "sampling_params.top_p",
         params(top_p=0.0)),
    Case("top_p above 1", INVALID, "sampling_params.top_p: must be in (0, 1], got 1.5", "sampling_params.top_p",
         params(top_p=1.5)),
    Case("top_p NaN", INVALID, "sampling_params.top_p: must be a finite number, got nan", "sampling_params.top_p",
         params(top_p=math.nan)),
    Case("negative min_p", INVALID, "sampling_params.min_p: must be in [0, 1], got -0.5", "sampling_params.min_p",
         params(min_p=-0.5)),
    Case("min_p above 1", INVALID, "sampling_params.min_p: must be in [0, 1], got 2.0", "sampling_params.min_p",
         params(min_p=2.0)),
    Case("repetition_penalty 0", INVALID, "sampling_params.repetition_penalty: must be > 0, got 0.0",
         "sampling_params.repetition_penalty", params(repetition_penalty=0.0)),
    Case("negative repetition_penalty", INVALID, "sampling_params.repetition_penalty: must be > 0, got -1.0",
         "sampling_params.repetition_penalty", params(repetition_penalty=-1.0)),
    Case("length_penalty NaN", INVALID, "sampling_params.length_penalty: must be a finite number, got nan",
         "sampling_params.length_penalty", params(length_penalty=math.nan)),
    Case("min_tokens above max_tokens", INVALID, "sampling_params.min_tokens: must be an integer in [0, max_tokens], "
         "got 5", "sampling_params.min_tokens", params(min_tokens=5)),
    Case("presence_penalty above 2", INVALID, "sampling_params.presence_penalty: must be in [-2.0, 2.0], got 3.0",
         "sampling_params.presence_penalty", params(presence_penalty=3.0)),
    Case("logit_bias outside the vocabulary", INVALID, "sampling_params.logit_bias: token id 999999 is outside the "
         "vocabulary [0, …)", "sampling_params.logit_bias", params(logit_bias=[{"token_id": 999999, "bias": 1.0}])),
    Case("logit_bias above 100", INVALID, "sampling_params.logit_bias: values must be in [-100, 100]",
         "sampling_params.logit_bias", params(logit_bias=[{"token_id": 5, "bias": 101.0}])),
    Case("prompt_logprobs 21", INVALID, "sampling_params.prompt_logprobs: must be an integer in [0, 20], got 21",
         "sampling_params.prompt_logprobs", params(prompt_logprobs=21)),
    Case("seed 2**63", INVALID, "sampling_params.seed: must be an integer in [0, 2**63), got 9223372036854775808",
         "sampling_params.seed", params(seed=2**63)),
    Case("n 0", INVALID, "sampling_params.n: must be an integer in [1, 16], got 0", "sampling_params.n", params(n=0)),
    Case("n 17", INVALID, "sampling_params.n: must be an integer in [1, 16], got 17", "sampling_params.n",
         params(n=17)),
    Case("n beyond the step's sequences", INVALID, "sampling_params.n: 16 sequences exceed the scheduler's step "
         "limit 1", "sampling_params.n", params(n=16, seed=1)),
    Case("beam_width 17", INVALID, "sampling_params.beam_width: must be an integer in [1, 16], got 17",
         "sampling_params.beam_width", params(beam_width=17)),
    Case("n with beam search", INVALID, "sampling_params.n: must be 1 with beam search (beam_width > 1 returns "
         "beam_width beams)", "sampling_params.n", params(n=2, beam_width=2)),
    Case("temperature with beam search", INVALID, "sampling_params.temperature: must be unset, 0 or 1 with beam "
         "search (beam search scores the model's log probabilities unchanged), got 0.69…",
         "sampling_params.temperature", params(beam_width=2, temperature=0.7)),
    Case("top_p with beam search", INVALID, "sampling_params.top_p: must be unset or 1.0 with beam search (beam "
         "search scores the model's log probabilities unchanged), got 0.5", "sampling_params.top_p",
         params(beam_width=2, top_p=0.5)),
    Case("top_k with beam search", INVALID, "sampling_params.top_k: must be unset or 0 with beam search (beam search "
         "scores the model's log probabilities unchanged), got 5", "sampling_params.top_k",
         params(beam_width=2, top_k=5)),
    Case("min_p with beam search", INVALID, "sampling_params.min_p: must be unset or 0.0 with beam search (beam "
         "search scores the model's log probabilities unchanged), got 0.1…", "sampling_params.min_p",
         params(beam_width=2, min_p=0.1)),
    Case("repetition_penalty with beam search", INVALID, "sampling_params.repetition_penalty: must be unset or 1.0 "
         "with beam search (beam search scores the model's log probabilities unchanged), got 1.2…",
         "sampling_params.repetition_penalty", params(beam_width=2, repetition_penalty=1.2)),
    Case("logprobs with beam search", INVALID, "sampling_params.logprobs: not returned with beam search (beams are "
         "chosen from the top candidates of every step)", "sampling_params.logprobs",
         params(beam_width=2, logprobs=True)),
    Case("top_logprobs with beam search", INVALID, "sampling_params.top_logprobs: not returned with beam search "
         "(beams are chosen from the top candidates of every step)", "sampling_params.top_logprobs",
         params(beam_width=2, top_logprobs=3)),
    Case("top_logprobs 21", INVALID, "sampling_params.top_logprobs: must be in [0, 20], got 21",
         "sampling_params.top_logprobs", params(top_logprobs=21)),
    Case("17 stop strings", INVALID, "sampling_params.stop: at most 16 stop strings, got 17", "sampling_params.stop",
         params(stop=["x"] * 17)),
    Case("stop string of 257 characters", INVALID, "sampling_params.stop: each stop string must be at most 256 "
         "characters", "sampling_params.stop", params(stop=["x" * 257])),
    Case("empty stop string", INVALID, "sampling_params.stop: must be non-empty strings", "sampling_params.stop",
         params(stop=[""])),
    Case("65 stop token ids", INVALID, "sampling_params.stop_token_ids: at most 64 stop token ids, got 65",
         "sampling_params.stop_token_ids", params(stop_token_ids=[5] * 65)),
    Case("stop token id outside the vocabulary", INVALID, "sampling_params.stop_token_ids: token id 1000 is outside "
         "the vocabulary [0, 1000)", "sampling_params.stop_token_ids", params(stop_token_ids=[1000])),
    # ---- the request
    Case("request_id of 300 characters", INVALID, "request_id: must be at most 256 characters", "request_id",
         {"request_id": "r" * 300, **params()}),
    Case("unknown model", INVALID, f"model: unknown model 'gpt-9'; this gateway serves '{MODEL}'", "model",
         {"model": "gpt-9", **params()}),
    Case("model name of 4000 characters (clipped)", INVALID, "model: unknown model 'mmm… (4000 characters); this "
         f"gateway serves '{MODEL}'", "model", {"model": "m" * 4000, **params()}),
    Case("request_id already running", "ALREADY_EXISTS", "request 'dup' is already running", setup="duplicate"),
    Case("waiting queue full", "RESOURCE_EXHAUSTED", "the server is at capacity: 2 sequences are waiting for "
         "admission (--max-num-waiting 2); retry later", setup="queue_full"),
    Case("deadline shorter than the generation", "DEADLINE_EXCEEDED", "Deadline Exceeded", setup="deadline"),
    # ---- other methods
    Case("Tokenize: unknown model", INVALID, f"model: unknown model 'gpt-9'; this gateway serves '{MODEL}'", "model",
         {"text": "hi", "model": "gpt-9"}, rpc="Tokenize"),
    Case("Tokenize: text over --max-prompt-bytes", INVALID, "text: is 2000000 bytes long; the limit is 1048576 bytes "
         "(--max-prompt-bytes)", "text", {"text": "x" * 2_000_000}, rpc="Tokenize"),
    Case("Tokenize: model name of 4000 characters (clipped)", INVALID, "model: unknown model 'mmm… (4000 "
         f"characters); this gateway serves '{MODEL}'", "model", {"text": "hi", "model": "m" * 4000}, rpc="Tokenize"),
    Case("Chat: role of 4000 characters (clipped)", INVALID, "messages[0].role: must be a non-empty string of at "
         "most 64 characters, got 'rrr… (4000 characters)", "messages[0].role",
         {"messages": [{"role": "r" * 4000, "content": "hi"}], "sampling_params": {"max_tokens": 4}}, rpc="Chat"),
    Case("Chat: no messages", INVALID, "messages: must hold at least one message", "messages",
         {"sampling_params": {"max_tokens": 4}}, rpc="Chat"),
    Case("unknown method", "UNIMPLEMENTED", "Method not found!", rpc="Unknown"),
    Case("health of an unknown service", "NOT_FOUND", "", rpc="Health", request={"service": "no.such.Service"}),
    # ---- authentication (the service with --auth-token-file)
    Case("no token", "UNAUTHENTICATED", "missing credentials: send 'authorization: Bearer <token>'",
         request=params(), service="token", setup="no_token"),
    Case("wrong token", "UNAUTHENTICATED", "invalid credentials", request=params(), service="token",
         setup="wrong_token"),
    Case("Tokenize without a token", "UNAUTHENTICATED", "missing credentials: send 'authorization: Bearer <token>'",
         request={"text": "hi"}, rpc="Tokenize", service="token", setup="no_token"),
    Case("health check without a token (open)", "OK", "SERVING", rpc="Health", request={}, service="token",
         setup="no_token"),
    Case("'bearer' in lower case (schemes are case-insensitive)", "OK", "", request=params(max_tokens=2),
         service="token", setup="lower_bearer"),
]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


def render_table(cases: list[Case] = CASES) -> str:
    """A markdown table of docs/ERRORS.md (the gRPC cases', or bad_http_inputs.py's)."""
    rows = ["| # | bad input | method | status | message | field |", "|---:|---|---|---|---|---|"]
    for i, c in enumerate(cases, 1):
        rows.append(f"| {i} | {_cell(c.name)} | {c.rpc} | {c.code} | `{_cell(c.message)}` | "
                    f"{'`' + c.field + '`' if c.field else ''} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(render_table(), end="")
