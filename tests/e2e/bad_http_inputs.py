"""The bad-input cases of docs/ERRORS.md on the OpenAI-compatible HTTP port, beside bad_inputs.py's gRPC
ones and against the same services (which start with --http-port). ``rpc`` is the method and route;
``code`` the HTTP status; ``field`` the error's ``param``; ``request`` the JSON body (a dict, or raw
bytes sent as they are); ``setup`` names a case that is more than one well-formed request (raw HTTP,
a body that never completes, headers, ...). ``python -m tests.e2e.bad_http_inputs`` prints the table.
"""

from __future__ import annotations

from tests.e2e.bad_inputs import MODEL, Case, render_table

COMPLETIONS, CHAT = "POST /v1/completions", "POST /v1/chat/completions"
LIMIT = "4194304 bytes (--max-request-bytes)"


def body(**kw) -> dict:
    return {"prompt": "hello", "max_tokens": 4, **kw}


def huge(name: str, digits: int) -> bytes:
    """A completions body whose ``name`` is a number of ``digits`` digits."""
    return b'{"prompt": "hello", "%s": 1%s}' % (name.encode(), b"0" * (digits - 1))


def chat(**kw) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kw}


# Each numeric field: what it must be when given a 400-digit number or a string.
NUMBERS = [("temperature", "a number"), ("top_p", "a number"), ("min_p", "a number"),
           ("repetition_penalty", "a number"), ("presence_penalty", "a number"), ("frequency_penalty", "a number"),
           ("max_tokens", "an integer"), ("n", "an integer"), ("best_of", "an integer"), ("seed", "an integer"),
           ("top_k", "an integer"), ("logprobs", "an integer")]


def _numbers() -> list[Case]:
    cases = [Case(f"{name}: a 400-digit number", "400", f"{name}: must be {what}, got a number of 400 digits", name,
                  huge(name, 400), COMPLETIONS) for name, what in NUMBERS]
    cases += [Case(f"{name}: a 5000-digit number", "400", f"{name}: must be {what}, got a number of 5000 digits",
                   name, huge(name, 5000), COMPLETIONS) for name, what in NUMBERS[::3]]
    cases += [Case(f"{name}: a string", "400", f"{name}: must be {what}, got 'abc'", name, body(**{name: "abc"}),
                   COMPLETIONS) for name, what in NUMBERS]
    return cases


HTTP_CASES = _numbers() + [
    # ---- numbers out of range, and other types
    Case("temperature 1e400 (infinite)", "400", "temperature: must be a finite number, got inf", "temperature",
         b'{"prompt": "hello", "temperature": 1e400}', COMPLETIONS),
    Case("temperature NaN", "400", "temperature: must be a finite number, got nan", "temperature",
         b'{"prompt": "hello", "temperature": NaN}', COMPLETIONS),
    Case("negative temperature", "400", "temperature: must be >= 0, got -1.0", "temperature",
         body(temperature=-1), COMPLETIONS),
    Case("top_p above 1", "400", "top_p: must be in (0, 1], got 2.0", "top_p", body(top_p=2), COMPLETIONS),
    Case("max_tokens 0 without echo", "400", "max_tokens: must be at least 1 (0 is allowed only with echo or "
         "prompt_logprobs)", "max_tokens", body(max_tokens=0),
         COMPLETIONS),
    Case("negative max_tokens", "400", "max_tokens: must be in [0, 4294967295], got -1", "max_tokens",
         body(max_tokens=-1), COMPLETIONS),
    Case("max_tokens true", "400", "max_tokens: must be an integer, got True", "max_tokens", body(max_tokens=True),
         COMPLETIONS),
    Case("max_tokens 2.5", "400", "max_tokens: must be an integer, got 2.5", "max_tokens", body(max_tokens=2.5),
         COMPLETIONS),
    Case("n 0", "400", "n: must be an integer in [1, 16], got 0", "n", body(n=0), COMPLETIONS),
    Case("n 17", "400", "n: must be an integer in [1, 16], got 17", "n", body(n=17, best_of=17), COMPLETIONS),
    Case("best_of 1 with n 'abc' (n is named)", "400", "n: must be an integer, got 'abc'", "n",
         body(best_of=1, n="abc"), COMPLETIONS),
    Case("best_of other than n", "400", "best_of: must equal n (the server returns every sample it draws)",
         "best_of", body(best_of=2), COMPLETIONS),
    Case("negative seed", "400", "seed: must be in [0, 18446744073709551615], got -1", "seed", body(seed=-1),
         COMPLETIONS),
    Case("seed 2**64", "400", "seed: must be in [0, 18446744073709551615], got 18446744073709551616", "seed",
         body(seed=2**64), COMPLETIONS),
    Case("top_k -2", "400", "top_k: must be -1, 0 (off) or positive, got -2", "top_k", body(top_k=-2), COMPLETIONS),
    Case("logprobs 21", "400", "logprobs: must be in [0, 20], got 21", "logprobs", body(logprobs=21), COMPLETIONS),
    Case("stream 1", "400", "stream: must be true or false, got 1", "stream", body(stream=1), COMPLETIONS),
    Case("ignore_eos 'yes'", "400", "ignore_eos: must be true or false, got 'yes'", "ignore_eos",
         body(ignore_eos="yes"), COMPLETIONS),
    Case("temperature a 100,000-character string (clipped)", "400", "temperature: must be a number, got 'hhh… "
         "(100000 characters)", "temperature", body(temperature="h" * 100_000), COMPLETIONS),
    Case("stop 5", "400", "stop: must be a string or a list of strings", "stop", body(stop=5), COMPLETIONS),
    Case("17 stop strings", "400", "stop: at most 16 stop strings, got 17", "stop", body(stop=["x"] * 17),
         COMPLETIONS),
    Case("stop_token_ids 'x'", "400", "stop_token_ids: must be a list of token ids", "stop_token_ids",
         body(stop_token_ids="x"), COMPLETIONS),
    Case("stop token id outside the vocabulary", "400", "stop_token_ids: token id 1000 is outside the vocabulary "
         "[0, 1000)", "stop_token_ids", body(stop_token_ids=[1000]), COMPLETIONS),
    Case("logit_bias 101", "400", "logit_bias: bias of token 5 must be a number in [-100, 100]", "logit_bias",
         body(logit_bias={"5": 101}), COMPLETIONS),
    Case("presence_penalty 3", "400", "presence_penalty: must be in [-2.0, 2.0], got 3.0", "presence_penalty",
         body(presence_penalty=3), COMPLETIONS),
    Case("tools on completions", "400", "tools: is not a parameter of /v1/completions on this server (see "
         "docs/OPENAI.md)", "tools", body(tools=[{"type": "function"}]), COMPLETIONS),
    Case("response_format xml", "400", "response_format.type: must be text, json_object or json_schema, got "
         "'xml'", "response_format.type", body(response_format={"type": "xml"}), COMPLETIONS),
    # ---- the prompt
    Case("no prompt", "400", "prompt: must be a string, a list of strings, a list of token ids or a list of such "
         "lists", "prompt", {"max_tokens": 4}, COMPLETIONS),
    Case("prompt 123", "400", "prompt: must be a string, …", "prompt", body(prompt=123), COMPLETIONS),
    Case("prompt []", "400", "prompt: must be a string, …", "prompt", body(prompt=[]), COMPLETIONS),
    Case("prompt nested 500 deep", "400", "prompt: must be a string, …", "prompt",
         b'{"prompt": ' + b"[" * 500 + b"]" * 500 + b"}", COMPLETIONS),
    Case("prompt token id a 400-digit number", "400", "prompt: must be a string, …", "prompt",
         b'{"prompt": [5, 1' + b"0" * 399 + b"]}", COMPLETIONS),
    Case("empty prompt", "400", "prompt: must not be empty", "prompt", body(prompt=""), COMPLETIONS),
    Case("prompt token id outside the vocabulary", "400", "prompt: ids[1] = 1000 is outside the vocabulary "
         "[0, 1000)", "prompt", body(prompt=[5, 1000]), COMPLETIONS),
    Case("prompt of 2100 token ids", "400", "prompt: a list of 2100 items is longer than a prompt of the context "
         "length (1024 tokens) and than --max-sequences-per-request (128 prompts)", "prompt",
         body(prompt=[5] * 2100), COMPLETIONS),
    Case("129 prompts", "400", "prompt: 129 prompt(s) x n=1 is 129 sequences; the limit is 128 per request "
         "(--max-sequences-per-request)", "prompt", body(prompt=["a"] * 129), COMPLETIONS),
    Case("65 prompts x n=2", "400", "prompt: 65 prompt(s) x n=2 is 130 sequences; the limit is 128 per request "
         "(--max-sequences-per-request)", "prompt", body(prompt=["a"] * 65, n=2, best_of=2), COMPLETIONS),
    Case("1000 prompts", "400", "prompt: 1000 prompt(s) x n=1 is 1000 sequences; the limit is 128 per request "
         "(--max-sequences-per-request)", "prompt", body(prompt=["a"] * 1000), COMPLETIONS),
    Case("n beyond the step's sequences", "400", "n: 2 sequences exceed the scheduler's step limit 1", "n",
         body(n=2, best_of=2, seed=1), COMPLETIONS),
    # ---- the model
    Case("unknown model", "404", f"The model 'gpt-9' does not exist; this server serves `{MODEL}`.", "model",
         body(model="gpt-9"), COMPLETIONS),
    Case("model of 4000 characters (clipped)", "404", "The model 'mmm… (4000 characters) does not exist; this "
         f"server serves `{MODEL}`.", "model", body(model="m" * 4000), COMPLETIONS),
    Case("model 123", "400", "model: must be a string", "model", body(model=123), COMPLETIONS),
    # ---- the body
    Case("body not JSON", "400", "body: is not valid JSON (Expecting property name enclosed in double quotes at "
         "line 1 column 2)", "body", b"{not json", COMPLETIONS),
    Case("empty body", "400", "body: is not valid JSON (Expecting value at line 1 column 1)", "body", b"",
         COMPLETIONS),
    Case("body not UTF-8", "400", "body: is not valid UTF-8", "body", b'{"prompt": "\xff\xfe"}', COMPLETIONS),
    Case("body a JSON array", "400", "body: must be a JSON object", "body", b"[1, 2]", COMPLETIONS),
    Case("JSON nested 100,000 deep", "400", "body: JSON nested too deeply", "body",
         b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", COMPLETIONS),
    Case("5 MB body (limit 4 MiB)", "413", f"body: is 5000… bytes, more than the limit of {LIMIT}", "body",
         b'{"prompt": "' + b"x" * 5_000_000 + b'"}', COMPLETIONS),
    Case("100 MB declared, 10 bytes sent", "413", f"body: is 100000000 bytes, more than the limit of {LIMIT}",
         "body", setup="declared_100mb", rpc=COMPLETIONS),
    Case("5 MB chunked body", "413", f"body: is more than the limit of {LIMIT}", "body", setup="chunked_5mb",
         rpc=COMPLETIONS),
    Case("1000 bytes declared, 10 sent (--http-body-timeout 1)", "408", "body: not received within 1 s "
         "(--http-body-timeout)", "body", setup="slow_body", rpc=COMPLETIONS),
    Case("headers never finished (--http-header-timeout 1)", "closed", "", setup="slow_head", rpc=COMPLETIONS),
    Case("malformed header line", "400", "Invalid header token", request=b"POST /v1/completions HTTP/1.1\r\n"
         b"Host: x\r\nBad Header\r\n\r\n", setup="raw", rpc=COMPLETIONS),
    Case("TLS bytes on the plain HTTP port", "400", "Received HTTPS traffic on an HTTP port",
         request=b"\x16\x03\x01\x02\x00 hello\r\n\r\n",
         setup="raw", rpc=COMPLETIONS),
    # ---- chat
    Case("chat: no messages", "400", "messages: must be a list of messages", "messages", {"max_tokens": 4}, CHAT),
    Case("chat: messages a string", "400", "messages: must be a list of messages", "messages",
         {"messages": "hi"}, CHAT),
    Case("chat: empty messages", "400", "messages: must hold at least one message", "messages",
         {"messages": []}, CHAT),
    Case("chat: message without content", "400", "messages[0].content: must be a string, got NoneType",
         "messages[0].content", {"messages": [{"role": "user"}]}, CHAT),
    Case("chat: role of 4000 characters (clipped)", "400", "messages[0].role: must be a non-empty string of at "
         "most 64 characters, got 'rrr… (4000 characters)", "messages[0].role",
         {"messages": [{"role": "r" * 4000, "content": "hi"}]}, CHAT),
    Case("chat: role 123", "400", "messages[0].role: must be a non-empty string of at most 64 characters, got 123",
         "messages[0].role", {"messages": [{"role": 123, "content": "hi"}]}, CHAT),
    Case("chat: image content part", "400", "messages[0].content: only text content parts are supported",
         "messages[0].content", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, CHAT),
    Case("chat: top_logprobs without logprobs", "400", "top_logprobs: needs logprobs set to true", "top_logprobs",
         chat(top_logprobs=2), CHAT),
    Case("chat: logprobs 'yes'", "400", "logprobs: must be true or false, got 'yes'", "logprobs",
         chat(logprobs="yes"), CHAT),
    Case("chat: max_completion_tokens 0", "400", "max_completion_tokens: must be an integer >= 1, got 0",
         "max_completion_tokens", chat(max_completion_tokens=0), CHAT),
    Case("chat: temperature a 400-digit number", "400", "temperature: must be a number, got a number of 400 "
         "digits", "temperature", b'{"messages": [], "temperature": 1' + b"0" * 399 + b"}", CHAT),
    # ---- routes
    Case("unknown route", "404", "no such route: GET /v1/nowhere", rpc="GET /v1/nowhere"),
    Case("GET on a POST route", "405", "method GET is not allowed on /v1/completions", rpc="GET /v1/completions"),
    Case("unknown model's card", "404", f"The model 'gpt-9' does not exist; this server serves `{MODEL}`.", "model",
         rpc="GET /v1/models/gpt-9"),
    # ---- authentication (the service with --auth-token-file)
    Case("no token", "401", "missing credentials: send 'Authorization: Bearer <token>'", request=body(),
         rpc=COMPLETIONS, service="token", setup="no_token"),
    Case("wrong token", "401", "invalid credentials", request=body(), rpc=COMPLETIONS, service="token",
         setup="wrong_token"),
    Case("Basic scheme", "401", "invalid credentials", request=body(), rpc=COMPLETIONS, service="token",
         setup="basic_scheme"),
    Case("'bearer' in lower case (schemes are case-insensitive)", "200", "", request=body(max_tokens=2),
         rpc=COMPLETIONS, service="token", setup="lower_bearer"),
    Case("health without a token (open)", "200", "", rpc="GET /health", service="token", setup="no_token"),
]


if __name__ == "__main__":
    print(render_table(HTTP_CASES), end="")
