"""The gateway checks every field of a GenerateRequest, names the bad one by its path, and resolves
the defaults of unset optional fields."""

import math

import pytest

import clients  # noqa: F401

# isort: split
from gpu_worker.sampling_params import InvalidField
from pagedserve.v1 import generation_pb2
from scheduler_svc.gateway.validation import (
    ModelLimits,
    ValidRequest,
    check_request,
    public_field,
    text_token_ids,
    validate_messages,
)

LIMITS = ModelLimits(name="demo", vocab_size=100, max_model_len=32)


def encode(text: str) -> list[int]:
    """A stand-in tokenizer: one token per character."""
    return [ord(c) % 100 for c in text]


def validate(req, limits: ModelLimits, encode) -> ValidRequest:
    """What the gateway does with a request, its async tokenizer pool replaced by ``encode``."""
    checked = check_request(req, limits)
    if checked.text is not None:
        return checked.resolve(text_token_ids(encode(checked.text), limits, "text", checked.truncate_prompt_tokens),
                               limits, "text")
    return checked.resolve(checked.prompt_token_ids, limits, "token_ids.ids")


def request(prompt="hello", **params) -> generation_pb2.GenerateRequest:
    params.setdefault("max_tokens", 8)
    req = generation_pb2.GenerateRequest(sampling_params=generation_pb2.SamplingParams(**params))
    if isinstance(prompt, str):
        req.text = prompt
    elif prompt is not None:
        req.token_ids.ids.extend(prompt)
    return req


def field_of(req) -> str:
    with pytest.raises(InvalidField) as err:
        validate(req, LIMITS, encode)
    assert str(err.value).startswith(f"{err.value.field}: ")
    return err.value.field


def test_defaults_of_unset_fields():
    valid = validate(request(), LIMITS, encode)
    p = valid.params
    assert valid.prompt_token_ids == encode("hello")
    assert (p.temperature, p.top_p, p.n, p.beam_width, p.length_penalty, p.repetition_penalty) == (1, 1, 1, 1, 1, 1)
    assert p.seed is None and p.max_tokens == 8
    assert len(valid.request_id) == 32  # made up when the client sends none
    proto = p.to_proto()
    assert (proto.temperature, proto.top_p, proto.n, proto.has_seed) == (1.0, 1.0, 1, False)


def test_set_fields_pass_through():
    req = request([5, 6, 7], temperature=0.0, top_p=0.5, top_k=3, seed=9, stop=["ab"], stop_token_ids=[4],
                  ignore_eos=True, logprobs=True, top_logprobs=2)
    req.request_id = "mine"
    req.model = "demo"
    valid = validate(req, LIMITS, encode)
    p = valid.params
    assert valid.request_id == "mine" and valid.prompt_token_ids == [5, 6, 7]
    assert (p.temperature, p.top_p, p.top_k, p.seed, p.stop, p.stop_token_ids) == (0.0, 0.5, 3, 9, ("ab",), (4,))
    assert p.ignore_eos and p.logprobs and p.top_logprobs == 2


@pytest.mark.parametrize("make, field", [
    (lambda: request(""), "text"),
    (lambda: request([]), "token_ids.ids"),
    (lambda: request(None), "prompt"),
    (lambda: request("x" * 32), "text"),  # over the context length: no room to generate
    (lambda: request([1] * 40), "token_ids.ids"),
    (lambda: request([5, 100]), "token_ids.ids"),
    (lambda: request(max_tokens=0), "sampling_params.max_tokens"),
    (lambda: request(max_tokens=40), "sampling_params.max_tokens"),  # prompt plus max_tokens over the context
    (lambda: request(top_p=1.5), "sampling_params.top_p"),
    (lambda: request(top_p=0.0), "sampling_params.top_p"),
    (lambda: request(temperature=-1.0), "sampling_params.temperature"),
    (lambda: request(temperature=math.nan), "sampling_params.temperature"),
    (lambda: request(temperature=math.inf), "sampling_params.temperature"),
    (lambda: request(min_p=2.0), "sampling_params.min_p"),
    (lambda: request(n=0), "sampling_params.n"),
    (lambda: request(n=17), "sampling_params.n"),
    (lambda: request(n=2, beam_width=2), "sampling_params.n"),  # beam search returns beam_width beams
    (lambda: request(beam_width=17), "sampling_params.beam_width"),
    (lambda: request(top_logprobs=21), "sampling_params.top_logprobs"),
    (lambda: request(early_stopping=7), "sampling_params.early_stopping"),
    (lambda: request(repetition_penalty=0.0), "sampling_params.repetition_penalty"),
    (lambda: request(length_penalty=math.nan), "sampling_params.length_penalty"),
    (lambda: request(seed=2**63), "sampling_params.seed"),
    (lambda: request(stop=[""]), "sampling_params.stop"),
    (lambda: request(stop=["x"] * 17), "sampling_params.stop"),
    (lambda: request(stop=["x" * 257]), "sampling_params.stop"),
    (lambda: request(stop_token_ids=[100]), "sampling_params.stop_token_ids"),
    (lambda: generation_pb2.GenerateRequest(model="gpt-9", text="hi"), "model"),
    (lambda: generation_pb2.GenerateRequest(request_id="r" * 300, text="hi"), "request_id"),
])
def test_bad_field_is_named(make, field):
    assert field_of(make()) == field


def test_scheduler_fields_map_to_public_paths():
    assert public_field("max_tokens") == "sampling_params.max_tokens"
    assert public_field("prompt") == "prompt"
    assert public_field("top_p") == "sampling_params.top_p"
    assert public_field("request_id") == "request_id"


@pytest.mark.parametrize("value, expected", [
    (generation_pb2.EARLY_STOPPING_UNSPECIFIED, False),
    (generation_pb2.EARLY_STOPPING_HEURISTIC, False),
    (generation_pb2.EARLY_STOPPING_ON_FULL, True),
    (generation_pb2.EARLY_STOPPING_NEVER, "never"),
])
def test_early_stopping_maps_to_transformers_values(value, expected):
    params = validate(request(beam_width=2, early_stopping=value), LIMITS, encode).params
    assert params.early_stopping.transformers == expected and type(params.early_stopping.transformers) is type(expected)


def test_chat_messages_are_checked_and_normalized():
    got = validate_messages([{"role": "system", "content": "be brief"}, {"role": "user", "content": "", "name": "ann"},
                             {"role": "assistant", "content": "ok", "extra": 1}])
    assert got == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "", "name": "ann"},
                   {"role": "assistant", "content": "ok"}]


@pytest.mark.parametrize("messages, field", [
    ([], "messages"),
    ([{"role": "user", "content": "hi"}] * 4097, "messages"),
    (["hi"], "messages[0]"),
    ([{"role": "user", "content": "hi"}, {"content": "hi"}], "messages[1].role"),
    ([{"role": "", "content": "hi"}], "messages[0].role"),
    ([{"role": "r" * 65, "content": "hi"}], "messages[0].role"),
    ([{"role": "user", "content": None}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "messages[0].content"),
    ([{"role": "user", "content": "hi", "name": 3}], "messages[0].name"),
])
def test_bad_chat_message_is_named(messages, field):
    with pytest.raises(InvalidField) as err:
        validate_messages(messages)
    assert err.value.field == field
