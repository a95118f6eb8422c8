import pytest

from gpu_worker.sampling_params import EarlyStopping
from scheduler_svc import InvalidField, SamplingParams


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"beam_width": 0}, "beam_width"),
        ({"seed": -1}, "seed"),
        ({"stop": ("",)}, "stop"),
        ({"top_logprobs": 21}, "top_logprobs"),
        # Not finite: each float is refused by name, whether or not its range check would catch it.
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": float("nan")}, "top_p"),
        ({"min_p": float("nan")}, "min_p"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"length_penalty": float("nan")}, "length_penalty"),
        ({"beam_width": 2, "length_penalty": float("-inf")}, "length_penalty"),
        # Beam search refuses what it would otherwise ignore.
        ({"beam_width": 2, "temperature": 0.7}, "temperature"),
        ({"beam_width": 2, "top_p": 0.5}, "top_p"),
        ({"beam_width": 2, "top_k": 5}, "top_k"),
        ({"beam_width": 2, "min_p": 0.1}, "min_p"),
        ({"beam_width": 2, "repetition_penalty": 1.2}, "repetition_penalty"),
        ({"beam_width": 2, "logprobs": True}, "logprobs"),
        ({"beam_width": 2, "top_logprobs": 3}, "top_logprobs"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    assert isinstance(err.value, InvalidField) and err.value.field == field
    assert str(err.value).startswith(field + ":")


def test_to_proto_resolves_seed_and_keeps_values():
    p = SamplingParams(max_tokens=7, temperature=0.5, top_k=3, top_p=0.9, seed=11, stop_token_ids=(4,))
    m = p.to_proto()
    assert (m.max_tokens, m.top_k, m.has_seed, m.seed, list(m.stop_token_ids)) == (7, 3, True, 11, [4])
    assert m.temperature == pytest.approx(0.5) and m.top_p == pytest.approx(0.9)
    assert not SamplingParams().to_proto().has_seed


def test_from_proto_inverts_to_proto():
    p = SamplingParams(max_tokens=7, temperature=0.5, top_k=3, top_p=0.75, min_p=0.125, seed=11, stop_token_ids=(4, 9),
                       ignore_eos=True, n=3, length_penalty=0.5, logprobs=True, top_logprobs=2, repetition_penalty=1.5)
    assert SamplingParams.from_proto(p.to_proto()) == p
    beams = SamplingParams(beam_width=4, early_stopping="never")
    assert SamplingParams.from_proto(beams.to_proto()) == beams
    assert SamplingParams.from_proto(SamplingParams(seed=0).to_proto()).seed == 0  # has_seed, not seed != 0


def test_from_proto_reads_unset_fields_as_their_defaults_and_validates():
    from pagedserve.internal.v1 import scheduler_pb2

    p = SamplingParams.from_proto(scheduler_pb2.SamplingParams(max_tokens=1))  # what a bare plan carries
    assert p == SamplingParams(max_tokens=1, temperature=0.0, length_penalty=0.0)
    assert (p.top_p, p.repetition_penalty, p.n, p.beam_width, p.seed) == (1.0, 1.0, 1, 1, None)
    assert p.early_stopping is EarlyStopping.HEURISTIC
    with pytest.raises(InvalidField) as err:
        SamplingParams.from_proto(scheduler_pb2.SamplingParams(max_tokens=0))
    assert err.value.field == "max_tokens"
    with pytest.raises(InvalidField) as err:
        SamplingParams.from_proto(scheduler_pb2.SamplingParams(max_tokens=1, early_stopping=7))
    assert err.value.field == "early_stopping"


def test_sequences_become_tuples_so_params_stay_hashable():
    p = SamplingParams(stop=["a"], stop_token_ids=[3])
    assert (p.stop, p.stop_token_ids) == (("a",), (3,))
    assert hash(p) == hash(SamplingParams(stop=("a",), stop_token_ids=(3,)))


def test_top_logprobs_imply_logprobs_and_beams_take_neutral_values():
    assert SamplingParams(top_logprobs=3).logprobs
    for temperature in (0.0, 1.0):  # unset (1) or greedy (0): the distribution beam search scores
        assert SamplingParams(beam_width=2, temperature=temperature).beam_width == 2


@pytest.mark.parametrize(("given", "rule", "hf"), [
    (False, EarlyStopping.HEURISTIC, False), (True, EarlyStopping.ON_FULL, True),
    ("never", EarlyStopping.NEVER, "never"), ("false", EarlyStopping.HEURISTIC, False),
    ("true", EarlyStopping.ON_FULL, True), (0, EarlyStopping.HEURISTIC, False),
    (EarlyStopping.NEVER, EarlyStopping.NEVER, "never"),
])
def test_early_stopping_is_one_enum_read_from_every_form(given, rule, hf):
    p = SamplingParams(beam_width=2, early_stopping=given)
    assert p.early_stopping is rule and rule.transformers == hf
    assert p.to_proto().early_stopping == rule.value and SamplingParams.from_proto(p.to_proto()) == p
    with pytest.raises(InvalidField, match="^early_stopping: must be False, True or 'never'"):
        SamplingParams(early_stopping="sometimes")


def test_invalid_field_keeps_the_reason_apart_from_the_field():
    with pytest.raises(InvalidField) as err:
        SamplingParams(top_p=0)
    assert (err.value.field, err.value.reason) == ("top_p", "must be in (0, 1], got 0")
    assert str(err.value) == "top_p: must be in (0, 1], got 0"


@pytest.mark.parametrize(("params", "plain"), [
    (SamplingParams(temperature=0), True),
    (SamplingParams(temperature=0, prompt_logprobs=2), True),  # prompt positions: checked per step by the worker
    (SamplingParams(temperature=0.5), False),
    (SamplingParams(temperature=0, logprobs=True), False),
    (SamplingParams(temperature=0, top_logprobs=2), False),
    (SamplingParams(temperature=0, repetition_penalty=1.2), False),
    (SamplingParams(temperature=0, presence_penalty=0.5), False),
    (SamplingParams(temperature=0, frequency_penalty=0.5), False),
    (SamplingParams(temperature=0, logit_bias={3: 1.0}), False),
    (SamplingParams(temperature=0, min_tokens=2), False),
])
def test_plain_greedy_is_decided_beside_the_fields(params, plain):
    assert params.plain_greedy is plain
    assert SamplingParams.from_proto(params.to_proto()).plain_greedy is plain  # as the worker sees a plan's


def test_for_beams_scores_the_model_unchanged():
    p = SamplingParams(beam_width=3, temperature=1.0, seed=5, length_penalty=0.5, early_stopping=True)
    beams = p.for_beams()
    assert (beams.temperature, beams.seed, beams.logprobs, beams.plain_greedy) == (0.0, None, False, True)
    assert (beams.beam_width, beams.length_penalty, beams.early_stopping) == (3, 0.5, EarlyStopping.ON_FULL)
