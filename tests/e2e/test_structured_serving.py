"""Structured output and tool calling end to end on the trained SmolLM2 (`make run`'s model, out/smollm2):
20 JSON schemas, greedy and sampled, over HTTP and gRPC, every output parses and validates; regex and
choice constraints on 20 prompts each; the openai SDK (response_format, beta parse, tools) and
LangChain; bad constraints refused by name while the service keeps serving. One service for the module."""

import ast
import asyncio
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import clients  # noqa: F401

# isort: split
from pagedserve.client import AsyncClient, Client, GenerationError, SamplingParams
from tests.e2e.structured_schemas import SCHEMAS
from tests.e2e.test_serving import Service

pytestmark = pytest.mark.slow
jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")
pytest.importorskip("xgrammar")

MAX_TOKENS = 160
PROMPTS = [f"Write a JSON record number {i} about {topic}:" for i, topic in enumerate(
    ["a person", "a city", "a book", "a car", "a planet", "a recipe", "a song", "a company", "a tree", "a river"] * 2)]
REGEX = r"[A-Z][a-z]{2,8} [0-9]{1,3}"
CHOICES = ["positive", "negative", "neutral"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 30}},
                   "required": ["timezone"]}}}


@pytest.fixture(scope="module")
def service(tmp_path_factory, smollm2_dir):
    svc = Service(smollm2_dir, tmp_path_factory.mktemp("logs"), "--http-port", "0")
    svc.http_base = http_base(svc)
    svc.model_dir = smollm2_dir
    yield svc
    assert svc.stop() == 0, "\n".join(svc.lines)


@pytest.fixture(scope="module")
def client(service):
    with openai.OpenAI(base_url=service.http_base, api_key="unused", max_retries=0, timeout=600) as c:
        yield c


def http_base(svc: Service) -> str:
    port = svc.wait_for(r"OpenAI-compatible HTTP API on http://127\.0\.0\.1:(\d+)/v1")
    return f"http://127.0.0.1:{port}/v1"


def _http_json(client, i, schema, temperature):
    r = client.chat.completions.create(
        model="", messages=[{"role": "user", "content": PROMPTS[i]}], max_tokens=MAX_TOKENS, temperature=temperature,
        seed=i, response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema,
                                                                        "strict": True}})
    return r.choices[0].message.content, r.choices[0].finish_reason


async def _grpc_all(target, params_list, prompts):
    async with AsyncClient(target) as c:
        results = await asyncio.gather(*(c.complete(p, params) for p, params in zip(prompts, params_list, strict=True)))
    return [(r[0].text, r[0].finish_reason) for r in results]


def _check_json(outputs):
    for (text, reason), schema in zip(outputs, SCHEMAS, strict=True):
        assert reason == "stop", (text, schema)
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_twenty_schemas_validate_over_http_and_grpc(service, client, temperature):
    assert len(SCHEMAS) == 20
    with ThreadPoolExecutor(len(SCHEMAS)) as pool:
        http = list(pool.map(lambda i: _http_json(client, i, SCHEMAS[i], temperature), range(len(SCHEMAS))))
    _check_json(http)
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=temperature, seed=i, json_schema=s)
              for i, s in enumerate(SCHEMAS)]
    _check_json(asyncio.run(_grpc_all(service.target, params, PROMPTS)))


def test_regex_and_choice_hold_on_twenty_prompts(service):
    regex = [SamplingParams(max_tokens=24, temperature=0.7, seed=i, regex=REGEX) for i in range(20)]
    choice = [SamplingParams(max_tokens=12, temperature=0.7, seed=i, choice=CHOICES) for i in range(20)]
    prompts = [f"Review {i}: the product was fine. Sentiment:" for i in range(20)]
    out = asyncio.run(_grpc_all(service.target, regex + choice, prompts + prompts))
    for text, reason in out[:20]:
        assert reason == "stop" and re.fullmatch(REGEX, text), text
    for text, reason in out[20:]:
        assert reason == "stop" and text in CHOICES, text


def test_openai_sdk_json_object_structured_outputs_and_parse(service, client):
    from pydantic import BaseModel, Field

    class City(BaseModel):  # bounded, so that greedy output ends within max_tokens
        name: str = Field(max_length=20)
        population: int = Field(ge=0, le=99_999_999)
        coastal: bool

    parsed = client.beta.chat.completions.parse(
        model="", messages=[{"role": "user", "content": "Describe Lisbon."}], response_format=City,
        max_tokens=MAX_TOKENS, temperature=0.0)
    assert isinstance(parsed.choices[0].message.parsed, City)
    r = client.chat.completions.create(model="", messages=[{"role": "user", "content": 'Repeat: {"ok": true}'}],
                                       response_format={"type": "json_object"}, max_tokens=MAX_TOKENS, temperature=0)
    _check_json_object(service.model_dir, r.choices[0].message.content, r.choices[0].finish_reason)
    r = client.completions.create(model="", prompt="The answer is", max_tokens=8, temperature=0,
                                  extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert r.choices[0].text in ("yes", "no")
    r = client.completions.create(model="", prompt="Code:", max_tokens=8, temperature=0,
                                  extra_body={"guided_regex": "[0-9]{4}"})
    assert re.fullmatch("[0-9]{4}", r.choices[0].text)
    r = client.completions.create(model="", prompt="Pick:", max_tokens=8, temperature=0,
                                  extra_body={"guided_grammar": 'root ::= "left" | "right"'})
    assert r.choices[0].text in ("left", "right")


def _check_json_object(model_dir, text: str, reason: str) -> None:
    """A finished output is a JSON object; one cut by max_tokens is the start of one (an xgrammar
    matcher of "any JSON object" accepts it)."""
    if reason == "stop":
        assert isinstance(json.loads(text), dict), text
        return
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from gpu_worker.constraint import Constraint

    info = xgr.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(model_dir))
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_grammar(Constraint("json_object").to_grammar()))
    assert reason == "length" and matcher.accept_string(text), text


def _tool_call(client, stream, **kwargs):
    messages = [{"role": "user", "content": "What is the weather in Paris in celsius?"}]
    if not stream:
        r = client.chat.completions.create(model="", messages=messages, tools=[WEATHER, TIME], max_tokens=MAX_TOKENS,
                                           temperature=0, **kwargs)
        return r.choices[0].message, r.choices[0].finish_reason
    with client.beta.chat.completions.stream(model="", messages=messages, tools=[WEATHER, TIME],
                                             max_tokens=MAX_TOKENS, temperature=0, **kwargs) as s:
        final = s.get_final_completion()
    return final.choices[0].message, final.choices[0].finish_reason


def _check_calls(message, names):
    assert message.tool_calls, message
    tools = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for call in message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function" and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), tools[call.function.name])


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_required_named_and_auto(client, stream):
    message, reason = _tool_call(client, stream, tool_choice="required", parallel_tool_calls=False)
    _check_calls(message, {"get_weather", "get_time"})
    assert reason == "tool_calls" and len(message.tool_calls) == 1
    message, reason = _tool_call(client, stream, tool_choice={"type": "function", "function": {"name": "get_time"}})
    _check_calls(message, {"get_time"})
    assert reason == "tool_calls"
    message, reason = _tool_call(client, stream, tool_choice="auto")
    if message.tool_calls:  # the model may answer in words: then it is plain content
        _check_calls(message, {"get_weather", "get_time"})
        assert reason == "tool_calls"
    else:
        assert isinstance(message.content, str) and reason in ("stop", "length")
    # the call and its result go back into the conversation through the chat template
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                   "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]
    r = client.chat.completions.create(model="", messages=history, tools=[WEATHER], max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_tool_call_arguments_arrive_in_fragments(client, tool_choice):
    """A streamed call sends its arguments as the model writes them (several deltas), and what the SDK
    gathers from them equals the non-streamed response's call."""
    messages = [{"role": "user", "content": "What is the weather in Paris in celsius?"}]
    kwargs = dict(model="", messages=messages, tools=[WEATHER, TIME], max_tokens=MAX_TOKENS, temperature=0,
                  tool_choice=tool_choice)
    whole = client.chat.completions.create(**kwargs).choices[0]
    fragments = []
    with client.beta.chat.completions.stream(**kwargs) as s:
        for event in s:
            if event.type == "tool_calls.function.arguments.delta":
                fragments.append((event.index, event.arguments_delta))
        final = s.get_final_completion().choices[0]
    assert whole.finish_reason == final.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in final.message.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    first = whole.message.tool_calls[0].function.arguments
    assert len(first) > 8 and len([f for i, f in fragments if i == 0]) > 1, fragments
    assert "".join(f for i, f in fragments if i == 0) == first
    _check_calls(final.message, {"get_weather", "get_time"})


def test_langchain_structured_output_and_bind_tools(service):
    lc = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=20)
        age: int = Field(ge=0, le=120)

    llm = lc.ChatOpenAI(base_url=service.http_base, api_key="unused", model="smollm2", temperature=0,
                        max_tokens=MAX_TOKENS, max_retries=0)
    person = llm.with_structured_output(Person, method="json_schema").invoke("Invent a person.")
    assert isinstance(person, Person)
    msg = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("Weather in Rome?")
    (call,) = msg.tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], WEATHER["function"]["parameters"])


def test_bad_constraints_are_refused_by_name_and_the_service_keeps_serving(service, client):
    cases = [
        ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
        ({"guided_regex": "[a-"}, "guided_regex"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "not a schema"}}},
         "response_format.json_schema"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"tools": [WEATHER], "tool_call_parser": "nonexistent"}, "tool_call_parser"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ]
    for extra, field in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                           extra_body=extra)
        assert err.value.body["param"] == field, err.value.body
    with Client(service.target) as c:
        for params, field in [(SamplingParams(max_tokens=4, grammar="root ::= nope"), "sampling_params.grammar"),
                              (SamplingParams(max_tokens=4, json_schema="{bad"), "sampling_params.json_schema"),
                              (SamplingParams(max_tokens=4, regex="(unclosed"), "sampling_params.regex")]:
            with pytest.raises(GenerationError) as err:
                c.complete("hi", params)
            assert err.value.code.name == "INVALID_ARGUMENT" and err.value.field == field, err.value
        (out,) = c.complete("hi", SamplingParams(max_tokens=4, temperature=0, choice=["ok"]))
        assert out.text == "ok" and out.finish_reason == "stop"


def test_readme_structured_example_runs_verbatim(service, capsys):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = readme.split("<!-- structured-example -->\n```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code.replace("http://localhost:8000/v1", service.http_base), "README.md", "exec"), {})
    city, call = capsys.readouterr().out.splitlines()
    assert isinstance(ast.literal_eval(city), dict)
    assert call.startswith("tool_calls get_weather {")
