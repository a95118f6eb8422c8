import torch

from gpu_worker.sampler import SampleRequest, sample
from gpu_worker.sampling_params import SamplingParams


def row(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=None, output_index=0, penalty=1.0, tokens=()):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
                            repetition_penalty=penalty)
    return SampleRequest(params, output_index, list(tokens))


def test_greedy_rows_take_argmax_and_report_raw_logprobs():
    logits = torch.randn(3, 50)
    res = sample(logits, [row(temperature=0.0)] * 3, num_top_logprobs=2)
    assert res.token_ids == logits.argmax(-1).tolist()
    lp = torch.log_softmax(logits, -1)
    assert torch.allclose(torch.tensor(res.logprobs), lp.max(-1).values, atol=1e-6)
    assert [ids[0] for ids in res.top_token_ids] == res.token_ids and len(res.top_logprobs[0]) == 2


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 100)
    want = logits.argmax(-1).tolist()
    assert sample(logits, [row(top_k=1)] * 4).token_ids == want
    assert sample(logits, [row(top_p=1e-6)] * 4).token_ids == want
    assert sample(logits, [row(min_p=1.0)] * 4).token_ids == want


def test_top_k_restricts_support():
    logits = torch.randn(1, 30)
    allowed = set(logits[0].topk(5).indices.tolist())
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        (tok,) = sample(logits, [row(top_k=5)], generator=g).token_ids
        assert tok in allowed


def test_seeded_rows_are_reproducible_and_batch_independent():
    logits = torch.randn(2, 1000)
    a = sample(logits, [row(seed=42, output_index=3), row(seed=42, output_index=4)]).token_ids
    b = sample(logits[1:], [row(seed=42, output_index=4)]).token_ids
    c = sample(logits, [row(seed=42, output_index=3), row(seed=42, output_index=4)]).token_ids
    assert a == c and a[1] == b[0]


def test_sampling_follows_the_distribution():
    probs = torch.tensor([[0.7, 0.2, 0.1]])
    g = torch.Generator().manual_seed(1)
    counts = [0, 0, 0]
    for _ in range(3000):
        counts[sample(probs.log(), [row()], generator=g).token_ids[0]] += 1
    assert abs(counts[0] / 3000 - 0.7) < 0.04 and abs(counts[2] / 3000 - 0.1) < 0.03


def test_repetition_penalty_as_in_transformers():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    # token 0 seen: 2.0 / 2 = 1.0 < 1.9, so greedy picks 1
    assert sample(logits, [row(temperature=0.0, penalty=2.0, tokens=[0])]).token_ids == [1]


def test_a_temperature_near_the_float_minimum_samples_the_greedy_token():
    """logits / 1e-38 overflows to +-inf and softmax of that is nan: every row used to come back as
    token 0. The limit of a vanishing temperature is greedy decoding."""
    torch.manual_seed(0)
    logits = torch.randn(6, 500) * 5
    logits[:, 0] = -50.0  # token 0 is never the answer
    logits[3] -= 100.0  # a row of negative logits only: all of them overflow to -inf
    want = sample(logits, [row(temperature=0.0)] * 6).token_ids
    for temperature in (1e-38, 1e-45, 3e-37, 1e-30):
        for seed in (None, 7):
            got = sample(logits, [row(temperature=temperature, seed=seed)] * 6,
                         generator=torch.Generator().manual_seed(3))
            assert got.token_ids == want, (temperature, seed)


def test_a_repetition_penalty_near_the_float_minimum_samples_a_seen_positive_token():
    """A seen token's positive logit divided by 1e-38 is +inf: its row's mass goes to such tokens
    (their limit), never to nan; with one of them it is the greedy pick."""
    logits = torch.tensor([[-3.0, 5.0, 4.0, -1.0, 2.0, 0.5]])
    only = [row(penalty=1e-38, tokens=[0, 2])]  # token 2 is the only seen positive one
    assert sample(logits, [row(temperature=0.0, penalty=1e-38, tokens=[0, 2])]).token_ids == [2]
    g = torch.Generator().manual_seed(0)
    assert {sample(logits, only, generator=g).token_ids[0] for _ in range(50)} == {2}
    both = [row(penalty=1e-38, tokens=[1, 2, 4])]  # 5e38 and 4e38 overflow, 2e38 does not
    assert {sample(logits, both, generator=g).token_ids[0] for _ in range(200)} == {1, 2}


def test_ordinary_temperatures_are_computed_as_before():
    """The overflow guard leaves every row that does not overflow to the plain division."""
    torch.manual_seed(1)
    logits = torch.randn(4, 300)
    for temperature in (0.05, 0.7, 1.0, 3.0):
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        probs = torch.softmax(logits / temperature, dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=g1)
        want = torch.argmax(probs / noise, dim=-1).tolist()
        assert sample(logits, [row(temperature=temperature)] * 4, generator=g2).token_ids == want
