"""max_tokens left unset resolves to the context's end, bounded for n > 1 samples and beams by what the
group holds alone on an empty pool, so the scheduler always admits it; an explicit one over the context
is refused in vLLM's words. A request that fits the served context always fits the pool it was sized to."""

import pytest

from gpu_worker.sampling_params import InvalidField, SamplingParams
from scheduler_svc.gateway.context_window import resolve_max_tokens
from tests.scheduler_svc.factories import scheduler

BLOCK, BLOCKS, CONTEXT = 4, 16, 64  # the served context is what the pool holds (EngineCore.served_context)


@pytest.mark.parametrize("prompt_len", [1, 3, 4, 5, 17, 40, 62])
@pytest.mark.parametrize("n, beams", [(1, 1), (2, 1), (3, 1), (16, 1), (1, 2), (1, 4)])
def test_unset_max_tokens_is_always_admitted(prompt_len, n, beams):
    params = SamplingParams(max_tokens=CONTEXT, n=n, beam_width=beams, seed=1 if n > 1 else None,
                            temperature=0.0 if beams > 1 else 1.0)
    resolved = resolve_max_tokens(params, False, prompt_len, CONTEXT, BLOCKS, BLOCK)
    s = scheduler(num_blocks=BLOCKS, block_size=BLOCK, max_model_len=CONTEXT, max_num_seqs=16)
    prompt = [5] * prompt_len
    group = max(n, beams)
    least = group * -(-(prompt_len + 1) // BLOCK) - (group - 1) * ((prompt_len - 1) // BLOCK)
    if least > BLOCKS:  # not even one token each fits: the prompt is refused, by the scheduler, by name
        with pytest.raises(InvalidField) as err:
            s.add_request(0, "r", prompt, resolved)
        assert err.value.field == "prompt"
        return
    s.add_request(0, "r", prompt, resolved)  # admitted: the group fits alone
    if group == 1:
        assert resolved.max_tokens == CONTEXT - prompt_len  # until the context ends
    else:
        assert 1 <= resolved.max_tokens <= CONTEXT - prompt_len
        # and one more token each would not have fitted (the bound is tight to a block)
        more = SamplingParams(max_tokens=resolved.max_tokens + BLOCK, n=n, beam_width=beams,
                              seed=1 if n > 1 else None, temperature=0.0 if beams > 1 else 1.0)
        if prompt_len + more.max_tokens <= CONTEXT:
            with pytest.raises(InvalidField):
                scheduler(num_blocks=BLOCKS, block_size=BLOCK, max_model_len=CONTEXT, max_num_seqs=16).add_request(
                    0, "r", prompt, more)


def test_explicit_max_tokens_over_the_context_is_refused_in_vllm_words():
    params = SamplingParams(max_tokens=30)
    assert resolve_max_tokens(params, True, 34, CONTEXT) is params  # 34 + 30 = 64 fits exactly
    with pytest.raises(InvalidField) as err:
        resolve_max_tokens(params, True, 35, CONTEXT)
    assert err.value.field == "max_tokens" and str(err.value) == (
        "max_tokens: This model's maximum context length is 64 tokens. However, you requested 65 tokens (35 in the "
        "messages, 30 in the completion). Please reduce the length of the messages or completion.")
