"""The batched mask fill and xgrammar's apply kernel against the serial fill and the PyTorch reference:
the same bits for every row at every step (live, terminated, failed-compile and unconstrained rows
mixed), the same masked logits for full and partial row sets, strided rows and half precision."""

import json
import random
from types import SimpleNamespace

import pytest
import torch

from gpu_worker.constraint import Constraint
from gpu_worker.grammar import SeqGrammar, apply_masks, apply_masks_reference, fill_threads, token_masks

pytestmark = pytest.mark.slow  # xgrammar and transformers imports take seconds
xgr = pytest.importorskip("xgrammar")

EOS = 2  # the cache fixture's (tests/gpu_worker/conftest.py)

SCHEMA = {"type": "object", "required": ["name", "n"], "properties": {
    "name": {"type": "string", "maxLength": 6}, "n": {"type": "integer"},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}}}}


def _allowed(bitmask: torch.Tensor, row: int, vocab: int) -> list[int]:
    bits = bitmask[row]
    return [t for t in range(vocab) if (int(bits[t // 32]) >> (t % 32)) & 1]


def test_batched_fill_equals_the_serial_fill(cache):
    rng = random.Random(0)
    schema = cache.get(Constraint.json_schema(SCHEMA))
    choice = cache.get(Constraint.choice(["yes", "no"]))
    bad = cache.get(Constraint("grammar", "root ::= missing"))
    states = []
    for i in range(12):  # constrained rows of three grammars, a failed compile, unconstrained rows
        future = None if i % 5 == 4 else bad if i == 7 else choice if i % 3 == 0 else schema
        grammar = SeqGrammar(future) if future else None
        states.append(SimpleNamespace(grammar=grammar, token_ids=[5, 6], num_prompt_tokens=2))
    twins = [SimpleNamespace(grammar=SeqGrammar(s.grammar.future) if s.grammar else None, token_ids=s.token_ids,
                             num_prompt_tokens=2) for s in states]
    seen_terminated = False
    for _ in range(30):
        rows, serial = token_masks(states, cache.vocab_size, [EOS], threads=1)
        rows_b, batched = token_masks(twins, cache.vocab_size, [EOS], threads=4)
        assert rows == rows_b == [i for i, s in enumerate(states) if s.grammar is not None]
        assert torch.equal(serial[rows], batched[rows])
        for i in rows:  # advance every row by a token its mask allows (EOS only once terminated)
            allowed = _allowed(serial, i, cache.vocab_size)
            seen_terminated |= allowed == [EOS] and i != 7
            states[i].token_ids.append(rng.choice(allowed))
    assert seen_terminated and _allowed(serial, 7, cache.vocab_size) == [EOS]
    assert fill_threads(64) >= 1 and fill_threads(1) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_kernel_apply_equals_the_reference(cache, dtype):
    matcher = xgr.GrammarMatcher(cache.get(Constraint.json_schema(SCHEMA)).result())
    bitmask = xgr.allocate_token_bitmask(5, cache.vocab_size)
    for row in range(5):
        matcher.fill_next_token_bitmask(bitmask, row)
        matcher.accept_string('{"name": "x"'[row:row + 1])
    logits = torch.randn(5, cache.vocab_size).to(dtype)
    for rows in ([0, 1, 2, 3, 4], [1, 3], [4]):
        want = apply_masks_reference(logits, rows, bitmask)
        got = apply_masks(logits.clone(), rows, bitmask)
        assert torch.equal(got, want)
        assert torch.isinf(want[rows]).any() and not torch.isinf(want[[r for r in range(5) if r not in rows]]).any()
    wide = torch.randn(5, 2 * cache.vocab_size).to(dtype)[:, ::2]  # strided rows
    assert torch.equal(apply_masks(wide, [0, 2], bitmask), apply_masks_reference(wide, [0, 2], bitmask))


def test_mask_fill_benchmark_runs_both_variants(cache, tmp_path):
    from scheduler_svc.bench import mask_fill

    out = mask_fill.main(["--rows", "3", "--steps", "3", "--model", cache.model, "--threads", "2",
                          "--json", str(tmp_path / "m.json")])  # it raises if the variants' masks differ
    assert json.loads((tmp_path / "m.json").read_text()) == out
    assert out["threads"] == 2 and all(out[v]["fill_ms"] > 0 and out[v]["apply_ms"] > 0 for v in ("before", "after"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_xgrammars_cuda_kernel_equals_the_reference(cache, dtype):
    """xgrammar's Triton kernel on CUDA, against the PyTorch reference that apply_masks runs there today:
    the check a GPU round makes before the kernel may replace the reference (gpu_worker/grammar.py)."""
    matcher = xgr.GrammarMatcher(cache.get(Constraint.json_schema(SCHEMA)).result())
    bitmask = xgr.allocate_token_bitmask(4, cache.vocab_size)
    for row in range(4):
        matcher.fill_next_token_bitmask(bitmask, row)
        matcher.accept_string('{"na'[row])
    logits = torch.randn(4, cache.vocab_size, device="cuda").to(dtype)
    for rows in ([0, 1, 2, 3], [2], [0, 3]):
        kernel = logits.clone()
        xgr.apply_token_bitmask_inplace(kernel, bitmask.to("cuda"), vocab_size=cache.vocab_size,
                                        indices=None if len(rows) == 4 else rows)
        assert torch.equal(kernel, apply_masks_reference(logits, rows, bitmask))
        assert torch.equal(apply_masks(logits.clone(), rows, bitmask), kernel)  # what the runner applies
