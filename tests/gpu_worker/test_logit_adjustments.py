"""The logit adjustments of the sampler (logit_bias, min_tokens, OpenAI's presence and frequency
penalties) against a direct statement of their formulas; prompt-logprob rows across prefill chunks;
the parameters' validation and their refusal with beam search."""

import pytest
import torch

from gpu_worker.model_runner import SeqState
from gpu_worker.prompt_logprobs import prompt_logprob_rows
from gpu_worker.sampler import SampleRequest, adjust_logits, sample
from gpu_worker.sampling_params import InvalidField, SamplingParams

EOS = 2


def req(prompt, outputs, **params) -> SampleRequest:
    return SampleRequest(SamplingParams(temperature=0.0, **params), len(outputs), list(prompt) + list(outputs))


def test_bias_and_openai_penalties_follow_the_formula():
    logits = torch.randn(1, 20)
    prompt, outputs = [4, 5, 6], [5, 7, 7, 9]
    r = req(prompt, outputs, presence_penalty=0.5, frequency_penalty=0.3, logit_bias={3: -2.0, 7: 1.0})
    got = adjust_logits(logits, [r])
    want = logits[0].clone()
    want[3] -= 2.0
    want[7] += 1.0
    for t in set(outputs):  # the prompt's tokens are not penalized (OpenAI/vLLM: output only)
        want[t] -= outputs.count(t) * 0.3 + 0.5
    assert torch.allclose(got[0], want)
    assert torch.equal(logits, logits.clone())  # the input is not modified


def test_min_tokens_bans_eos_and_stop_ids_until_reached():
    logits = torch.zeros(1, 10)
    logits[0, EOS] = 5.0
    logits[0, 8] = 4.0
    early = req([1], [3], min_tokens=3, stop_token_ids=(8,))
    assert sample(logits, [early], eos_token_ids=(EOS,)).token_ids[0] not in (EOS, 8)
    assert sample(logits, [req([1], [3, 3, 3], min_tokens=3)], eos_token_ids=(EOS,)).token_ids == [EOS]
    ignoring = req([1], [3], min_tokens=3, ignore_eos=True)  # EOS is no stop then: not banned
    assert sample(logits, [ignoring], eos_token_ids=(EOS,)).token_ids == [EOS]


def test_untouched_rows_keep_their_logits():
    logits = torch.randn(2, 10)
    assert adjust_logits(logits, [req([1], []), req([1], [2])]) is logits


def test_prompt_logprob_rows_cover_each_prompt_position_once_across_chunks():
    prompt = list(range(10, 20))  # 10 tokens: logprobs for positions 1..9
    state = SeqState(7, list(prompt), len(prompt), 0, [], SamplingParams(prompt_logprobs=2))
    other = SeqState(8, [1, 2, 3], 3, 0, [], SamplingParams())
    rows = prompt_logprob_rows([(other, 3), (state, 4)])
    assert rows.indices == [3, 4, 5, 6] and rows.targets == prompt[1:5] and rows.spans == [(7, 1, 4, 2)]
    state.num_computed_tokens = 4
    rows = prompt_logprob_rows([(state, 6)])  # the last chunk: position 9 predicts the first output
    assert rows.indices == [0, 1, 2, 3, 4] and rows.targets == prompt[5:] and rows.spans == [(7, 5, 5, 2)]


@pytest.mark.parametrize("params,field", [
    ({"min_tokens": 17}, "min_tokens"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3.0}, "frequency_penalty"),
    ({"logit_bias": {1: 150.0}}, "logit_bias"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"beam_width": 2, "min_tokens": 1}, "min_tokens"),
    ({"beam_width": 2, "presence_penalty": 0.1}, "presence_penalty"),
    ({"beam_width": 2, "frequency_penalty": 0.1}, "frequency_penalty"),
    ({"beam_width": 2, "logit_bias": {1: 1.0}}, "logit_bias"),
    ({"beam_width": 2, "prompt_logprobs": 0}, "prompt_logprobs"),
])
def test_invalid_settings_are_refused_by_name(params, field):
    with pytest.raises(InvalidField) as err:
        SamplingParams(max_tokens=16, **params)
    assert err.value.field == field


def test_parameters_survive_the_proto():
    p = SamplingParams(max_tokens=9, min_tokens=4, presence_penalty=0.5, frequency_penalty=-1.0,
                       logit_bias={9: -100.0, 3: 2.5}, prompt_logprobs=0)
    assert SamplingParams.from_proto(p.to_proto()) == p
    assert SamplingParams.from_proto(SamplingParams().to_proto()).prompt_logprobs is None
