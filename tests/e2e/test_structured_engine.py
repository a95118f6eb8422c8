"""Constrained decoding in the engine (scheduler + worker processes) on a small random checkpoint: greedy
ids equal transformers' generate with xgrammar's logits processor; the same under recompute preemption
(a pool too small for the batch) and on a prefix-cache hit; n > 1 and beams stay inside the grammar."""

import json
import random

import pytest
import torch

from gpu_worker.constraint import Constraint
from scheduler_svc import LLM, SamplingParams
from tests.factories import make_checkpoint

pytestmark = pytest.mark.slow
xgr = pytest.importorskip("xgrammar")

MAX_TOKENS = 24
SCHEMA = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "tag": {"enum": ["alpha", "beta"]}},
          "required": ["id", "tag"], "additionalProperties": False}
CONSTRAINTS = [
    Constraint.json_schema(SCHEMA),
    Constraint("regex", r"[a-f]{2,6}-[0-9]{1,3}"),
    Constraint.choice(["paged", "attention", "block table"]),
    Constraint("grammar", 'root ::= "(" item ("," item)* ")"\nitem ::= [a-z] | root'),
]
PROMPT_LENS = [3, 17, 40, 90]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama")


@pytest.fixture(scope="module")
def cases(checkpoint):
    """(prompt ids, constraint): every constraint with every prompt length."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(checkpoint).vocab_size
    rng = random.Random(0)
    return [([rng.randrange(3, vocab) for _ in range(n)], c) for c in CONSTRAINTS for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def hf_constrained(checkpoint, cases):
    """transformers' greedy ids with xgrammar's logits processor (fp32, one prompt at a time)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpu_worker.model_config import ModelConfig

    cfg = ModelConfig.from_dir(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    info = xgr.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(checkpoint), vocab_size=cfg.vocab_size,
                                              stop_token_ids=cfg.eos_token_ids)
    compiler = xgr.GrammarCompiler(info)
    outs = []
    with torch.inference_mode():
        for prompt, constraint in cases:
            processor = xgr.contrib.hf.LogitsProcessor(compiler.compile_grammar(constraint.to_grammar()))
            ids = torch.tensor([prompt])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                                 do_sample=False, pad_token_id=cfg.eos_token_ids[0], logits_processor=[processor])
            outs.append(gen[0, len(prompt):].tolist())
    return outs


def _generate(llm, cases, **params):
    return [r.outputs for r in llm.generate(
        [p for p, _ in cases], [SamplingParams(max_tokens=MAX_TOKENS, constraint=c, **params) for _, c in cases])]


def _check(results, want, eos_ids):
    for i, (outputs, ids) in enumerate(zip(results, want, strict=True)):
        (out,) = outputs
        assert out.token_ids == ids, f"case {i}"
        assert out.finish_reason == ("stop" if ids[-1] in eos_ids else "length"), f"case {i}"


def test_constrained_greedy_equals_transformers_with_xgrammar(checkpoint, cases, hf_constrained):
    with LLM(checkpoint, block_size=16) as llm:
        eos = set(llm.info.eos_token_ids)
        assert any(ids[-1] in eos for ids in hf_constrained), "no case reached the end of its grammar"
        _check(_generate(llm, cases, temperature=0.0), hf_constrained, eos)
        # the same prompts again: their prefixes are cached now
        before = llm.stats()
        _check(_generate(llm, cases, temperature=0.0), hf_constrained, eos)
        assert llm.stats().num_cached_prompt_tokens > before.num_cached_prompt_tokens
        # unconstrained requests in the same batch are unaffected, constrained ones still hold
        mixed = llm.generate([p for p, _ in cases[:4]] * 2,
                             [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)] * 4
                             + [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, constraint=c)
                                for _, c in cases[:4]])
        assert [r.outputs[0].token_ids for r in mixed[4:]] == hf_constrained[:4]


def test_constrained_greedy_survives_recompute_preemption(checkpoint, cases, hf_constrained):
    from gpu_worker.model_config import ModelConfig

    cfg = ModelConfig.from_dir(checkpoint)
    kv_bytes = 12 * 16 * cfg.kv_bytes_per_token(torch.float32)  # 12 blocks: the batch needs ~30
    with LLM(checkpoint, block_size=16, kv_cache_memory=kv_bytes) as llm:
        results = _generate(llm, cases, temperature=0.0)
        assert llm.stats().num_preemptions > 0, "the pool was meant to force preemption"
        _check(results, hf_constrained, set(llm.info.eos_token_ids))


def test_samples_and_beams_stay_in_the_grammar(checkpoint, cases):
    choice = CONSTRAINTS[2]
    allowed = json.loads(choice.source)
    prompts = [p for p, c in cases if c == choice]
    with LLM(checkpoint, block_size=16) as llm:
        sampled = llm.generate(prompts, SamplingParams(max_tokens=16, n=4, temperature=1.5, seed=3, constraint=choice))
        beams = llm.generate(prompts, SamplingParams(max_tokens=16, beam_width=3, constraint=choice))
        regex = llm.generate(prompts, SamplingParams(max_tokens=12, n=3, temperature=1.0, constraint=CONSTRAINTS[1]))
        with pytest.raises(ValueError) as err:  # checked before it reaches the engine
            llm.generate(prompts[:1], SamplingParams(constraint=Constraint("grammar", "root ::= nope")))
        assert err.value.field == "constraint"
    for r in sampled + beams:
        for out in r.outputs:
            assert out.text in allowed and out.finish_reason == "stop", out
    import re

    for r in regex:
        for out in r.outputs:
            if out.finish_reason == "stop":
                assert re.fullmatch(r"[a-f]{2,6}-[0-9]{1,3}", out.text), out.text
