import pytest

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
