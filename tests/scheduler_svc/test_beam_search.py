"""Beam search selection rules, by hand and against transformers' generate(num_beams=k, do_sample=False)
driven step by step with the same model's log probabilities."""

import math
import random

import pytest

from scheduler_svc.beam_search import BeamSearch, length_normalized

EOS = 99


def test_candidates_keep_beams_running_and_only_the_top_width_may_finish():
    bs = BeamSearch(2, num_prompt_tokens=3, max_num_tokens=10, stop_token_ids=frozenset({EOS}))
    assert bs.num_candidates == 4
    running = bs.step([0.0], [[]], [[EOS, 5, 6, 7]], [[-0.1, -0.2, -0.3, -0.4]])
    assert [(c.beam, c.token_id, c.score) for c in running] == [(0, 5, -0.2), (0, 6, -0.3)]
    assert [(h.token_ids, h.score) for h in bs.finished] == [([EOS], -0.1)]
    # EOS ranked third among the candidates: it cannot finish.
    running = bs.step([-0.2, -0.3], [[5], [6]], [[8, EOS], [9, EOS]], [[-0.1, -0.9], [-0.1, -0.2]])
    assert [(c.beam, c.token_id) for c in running] == [(0, 8), (1, 9)]
    assert len(bs.finished) == 1 and not bs.done


def test_hypotheses_are_length_penalized_and_sorted_best_first():
    bs = BeamSearch(2, 1, 10, frozenset({EOS}), length_penalty=2.0)
    bs.step([0.0], [[]], [[4, 5, 6, 7]], [[-1.0, -1.1, -5.0, -6.0]])
    bs.step([-1.0, -1.1], [[4], [5]], [[EOS, 8], [EOS, 9]], [[-1.0, -3.0], [-0.5, -3.0]])
    assert [(h.token_ids, h.score) for h in bs.finished] == [([5, EOS], -1.6 / 4), ([4, EOS], -2.0 / 4)]


@pytest.mark.parametrize(("early_stopping", "done"), [(True, True), (False, True), ("never", False)])
def test_early_stopping_rules(early_stopping, done):
    bs = BeamSearch(2, 1, 20, frozenset({EOS}), length_penalty=1.0, early_stopping=early_stopping)
    bs.step([0.0], [[]], [[4, 5, 6, 7]], [[-1.0, -1.1, -5.0, -6.0]])
    # Both finish at -2.0/2 and -2.1/2; the best running beam (-4.0) scores -2.0 at length 2:
    # no better than the worst finished (-1.05), so the heuristic stops too. "never" with a positive
    # length penalty scores it at the longest length (19): -4.0/19 > -1.05, so it goes on.
    bs.step([-1.0, -1.1], [[4], [5]], [[EOS, 8], [EOS, 9]], [[-1.0, -3.0], [-1.0, -3.5]])
    assert len(bs.finished) == 2 and bs.done is done


def test_every_candidate_at_the_length_limit_ends_the_search():
    bs = BeamSearch(2, 3, 5, frozenset({EOS}))
    bs.step([0.0], [[]], [[4, 5, 6, 7]], [[-1.0, -1.1, -5.0, -6.0]])
    assert bs.step([-1.0, -1.1], [[4], [5]], [[8, 9], [10, 11]], [[-1.0, -2.0], [-0.1, -0.2]]) == []
    assert bs.done and [h.token_ids for h in bs.finished] == [[5, 10], [5, 11]]


@pytest.mark.parametrize("length_penalty", [1000.0, 3e38, -2000.0, -3e38, 1e-45])
def test_any_finite_length_penalty_scores_without_raising(length_penalty):
    """Python's float power overflows (1000, 3e38) or its quotient divides by 0 (-2000): the search
    goes on with the IEEE limits and ends as it would with a penalty of that sign."""
    for early_stopping in (False, True, "never"):
        bs = BeamSearch(2, 1, 6, frozenset({EOS}), length_penalty=length_penalty, early_stopping=early_stopping)
        running = bs.step([0.0], [[]], [[4, EOS, 6, 7]], [[-1.0, -1.1, -5.0, -6.0]])
        num_out = 1
        while not bs.done:
            outputs = [[c.token_id] * num_out for c in running]
            num_out += 1
            running = bs.step([c.score for c in running], outputs, [[EOS, 8]] * len(running),
                              [[-0.5, -0.7]] * len(running))
        assert 1 <= len(bs.finished) <= 2
        assert not any(math.isnan(h.score) for h in bs.finished)


def test_length_normalized_is_the_quotient_where_it_exists_and_its_limit_elsewhere():
    for score, length, lp in [(-3.5, 7, 1.0), (-2.25, 3, 2.0), (-1.0, 5, -0.5), (-4.0, 9, 0.0), (0.0, 4, 1.5)]:
        assert length_normalized(score, length, lp) == score / length**lp
    assert length_normalized(-3.0, 6, 1000.0) == 0.0  # 6**1000.0 overflows a float
    assert length_normalized(-3.0, 2, -2000.0) == -math.inf  # 2**-2000.0 underflows to 0
    assert length_normalized(0.0, 2, -2000.0) == 0.0  # nothing to scale: no nan
    assert length_normalized(-math.inf, 6, 1000.0) == -math.inf
    assert length_normalized(-3.0, 1, 3e38) == -3.0  # length 1: any power is 1


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM

    from tests.factories import make_checkpoint

    path = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", arch="llama")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_beams(model, prompt, k, max_new, length_penalty, early_stopping, eos):
    import torch

    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=k, num_return_sequences=k,
                         do_sample=False, max_new_tokens=max_new, length_penalty=length_penalty,
                         early_stopping=early_stopping, eos_token_id=eos, pad_token_id=2)
    return [row[len(prompt):].tolist() for row in out]


def our_beams(model, prompt, k, max_new, length_penalty, early_stopping, eos):
    import torch

    bs = BeamSearch(k, len(prompt), len(prompt) + max_new, frozenset(eos), length_penalty, early_stopping)
    beams = [(0.0, [])]
    while True:
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + out for _, out in beams])).logits[:, -1].float()
        top = torch.log_softmax(logits, dim=-1).topk(bs.num_candidates)
        chosen = bs.step([s for s, _ in beams], [out for _, out in beams], top.indices.tolist(), top.values.tolist())
        if bs.done:
            return [h.token_ids for h in bs.finished]
        beams = [(c.score, beams[c.beam][1] + [c.token_id]) for c in chosen]


@pytest.mark.parametrize(
    ("k", "length_penalty", "early_stopping", "seed", "lengths"),
    [(2, 1.0, False, 10, [2, 4]), (3, 2.0, "never", 3, [10, 10, 10]), (4, 0.5, True, 4, [2, 7, 9, 10]),
     (4, 1.0, "never", 4, [10, 9, 10, 10])],
)
def test_selection_equals_transformers(hf_model, k, length_penalty, early_stopping, seed, lengths):
    rng = random.Random(seed)
    prompt = [rng.randrange(3, 1000) for _ in range(7)]
    # A second stop token that the best beam meets early, so that hypotheses end at different lengths.
    frequent = hf_beams(hf_model, prompt, k, 4, 1.0, False, [1])[0][1]
    want = hf_beams(hf_model, prompt, k, 10, length_penalty, early_stopping, [1, frequent])
    got = our_beams(hf_model, prompt, k, 10, length_penalty, early_stopping, [1, frequent])
    assert [len(g) for g in got] == lengths
    assert [w[: len(g)] for w, g in zip(want, got, strict=True)] == got
    assert all(t == 2 for w, g in zip(want, got, strict=True) for t in w[len(g):])  # then padding
