"""Constrained decoding's pieces on the demo tokenizer: constraints parse or are refused by name, the
device mask equals xgrammar's own, matchers replay, roll back and fork as sequences do, and a grammar
that fails to compile ends only its own sequence."""

from types import SimpleNamespace

import pytest
import torch

from gpu_worker.constraint import Constraint, ConstraintError
from gpu_worker.grammar import SeqGrammar, apply_masks, token_masks
from gpu_worker.sampling_params import InvalidField, SamplingParams

pytestmark = pytest.mark.slow  # xgrammar and transformers imports take seconds
xgr = pytest.importorskip("xgrammar")

EOS = 2  # the cache fixture's (tests/gpu_worker/conftest.py)


@pytest.fixture(scope="module")
def tokenizer(cache):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cache.model)


def _state(grammar, outputs=()):
    return SimpleNamespace(grammar=grammar, token_ids=[5, 6, 7, *outputs], num_prompt_tokens=3)


def _allowed(cache, grammar, outputs=()) -> set[int]:
    rows, bitmask = token_masks([_state(grammar, outputs)], cache.vocab_size, [EOS])
    logits = apply_masks(torch.zeros(1, cache.vocab_size), rows, bitmask)
    return set(torch.nonzero(torch.isfinite(logits[0]))[:, 0].tolist())


def test_constraints_parse_or_are_refused():
    Constraint.json_schema({"type": "object"}).check()
    Constraint("regex", "[a-z]+").check()
    Constraint.choice(["yes", "no \"quoted\""]).check()
    Constraint("grammar", 'root ::= "a" | "b"').check()
    Constraint("json_object").check()
    with pytest.raises(ConstraintError, match="not JSON"):
        Constraint.json_schema("{nope")
    with pytest.raises(ConstraintError, match="Unclosed"):
        Constraint("regex", "[a-").check()
    with pytest.raises(ConstraintError, match="not defined"):
        Constraint("grammar", "root ::= missing").check()
    with pytest.raises(ConstraintError):
        Constraint.choice([])
    with pytest.raises(InvalidField, match="ignore_eos"):
        SamplingParams(constraint=Constraint("json_object"), ignore_eos=True)
    params = SamplingParams(constraint=Constraint.choice(["a", "b"]))
    assert SamplingParams.from_proto(params.to_proto()) == params
    assert SamplingParams.from_proto(SamplingParams().to_proto()).constraint is None


def test_device_mask_equals_xgrammar(cache):
    compiled = cache.get(Constraint.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}})).result()
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, cache.vocab_size)
    matcher.fill_next_token_bitmask(bitmask, 0)
    logits = torch.randn(3, cache.vocab_size)
    want = logits.clone()
    xgr.apply_token_bitmask_inplace(want[1:2], bitmask)
    rows_mask = xgr.allocate_token_bitmask(3, cache.vocab_size)  # row i of the mask is logits row i
    rows_mask[1] = bitmask[0]
    got = apply_masks(logits.clone(), [1], rows_mask)
    assert torch.equal(got, want)
    assert torch.equal(apply_masks(logits[1:2].clone(), [0], bitmask), want[1:2])


def test_choice_matcher_replays_rolls_back_and_forks(cache, tokenizer):
    future = cache.get(Constraint.choice(["yes", "no"]))
    assert cache.get(Constraint.choice(["yes", "no"])) is future  # cached by source
    yes = tokenizer.encode("yes", add_special_tokens=False)
    no = tokenizer.encode("no", add_special_tokens=False)
    g = SeqGrammar(future)
    first = _allowed(cache, g)
    assert yes[0] in first and no[0] in first and EOS not in first
    assert _allowed(cache, g, yes) == {EOS}  # complete: only end-of-sequence
    assert g.accepted == yes
    assert _allowed(cache, g, no) == {EOS}  # last token replaced (a beam): rolled back, re-accepted
    assert g.accepted == no
    child = g.fork()
    assert _allowed(cache, child, no) == {EOS} and child.accepted == no
    fresh = SeqGrammar(future)  # a recomputed sequence replays its outputs
    assert _allowed(cache, fresh, yes) == {EOS} and fresh.accepted == yes


def test_unconstrained_rows_pay_nothing(cache):
    assert token_masks([SimpleNamespace(grammar=None)] * 4, cache.vocab_size, [EOS]) is None


def test_a_grammar_that_fails_to_compile_ends_only_its_sequence(cache):
    bad = SeqGrammar(cache.get(Constraint("grammar", "root ::= missing")))
    good = SeqGrammar(cache.get(Constraint("regex", "[0-9]+")))
    states = [_state(bad), _state(None), _state(good)]
    rows, bitmask = token_masks(states, cache.vocab_size, [EOS])
    logits = apply_masks(torch.zeros(3, cache.vocab_size), rows, bitmask)
    assert torch.nonzero(torch.isfinite(logits[0]))[:, 0].tolist() == [EOS]
    assert torch.isfinite(logits[1]).all()
    assert 1 < torch.isfinite(logits[2]).sum() < cache.vocab_size
