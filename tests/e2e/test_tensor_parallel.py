"""Tensor parallelism end to end on CPU (gloo): the scheduler and 2 (or 4) worker ranks as processes.

`pagedserve offline --tensor-parallel-size 2` gives transformers' greedy ids (fp32) on every family; with
preemption (recompute and swap, a tiny pool, chunked prefill), prefix caching and beam search the
results stay transformers' and seeded samples stay those of one rank; 4 ranks (KV heads replicated) give
the same ids; a model whose heads do not split fails at start naming the size; and a rank killed while
`pagedserve serve --tensor-parallel-size 2` streams ends every stream UNAVAILABLE within 5 s and the
launcher exits non-zero.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpu_worker.demo_model import ARCHS, VOCAB_SIZE
from gpu_worker.model_config import ModelConfig
from scheduler_svc import LLM, SamplingParams
from tests.e2e.tp_helpers import kill_mid_stream, serve_two_ranks
from tests.factories import hf_greedy, make_checkpoint, random_prompts

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MAX_TOKENS = 24
PROMPT_LENS = [1, 5, 17, 40, 70]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", arch="llama")


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(PROMPT_LENS, VOCAB_SIZE, seed=1)


@pytest.fixture(scope="module")
def hf(llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()


def hf_generate(model, prompt, **kw) -> list[list[int]]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False,
                             pad_token_id=2, **kw)
    return [row[len(prompt):].tolist() for row in out]


@pytest.mark.parametrize("arch", ARCHS)
def test_offline_cli_two_ranks_equal_transformers(arch, tmp_path):
    path = make_checkpoint(tmp_path / arch, arch=arch)
    prompts = random_prompts([1, 5, 16, 17, 33, 64, 90], VOCAB_SIZE, seed=len(arch))
    ids_file = tmp_path / "prompts.json"
    ids_file.write_text(json.dumps(prompts))
    proc = subprocess.run(
        [sys.executable, "-m", "scheduler_svc.cli", "offline", "--model", str(path), "--prompt-ids", str(ids_file),
         "--max-tokens", str(MAX_TOKENS), "--temperature", "0", "--json", "--device", "cpu",
         "--tensor-parallel-size", "2"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert proc.returncode == 0, proc.stderr
    got = [json.loads(line)["outputs"][0]["token_ids"] for line in proc.stdout.splitlines()]
    assert got == hf_greedy(path, prompts, MAX_TOKENS)


def test_preemption_prefix_caching_and_beam_search_with_two_ranks(llama, prompts, hf):
    beam_cases = [(prompts[1], 2), (prompts[3], 4)]
    beam_params = [SamplingParams(max_tokens=MAX_TOKENS, beam_width=k, ignore_eos=True) for _, k in beam_cases]
    sampled = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=123, n=3, ignore_eos=True)
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    # 48 blocks of 4 tokens per rank, each rank holding half the KV heads; 32-token steps: prompts are
    # chunked, and the requests (and beam groups) do not fit together
    kv_bytes = 48 * 4 * ModelConfig.from_dir(llama).for_rank(2).kv_bytes_per_token(torch.float32)
    with LLM(llama, block_size=4, kv_cache_memory=kv_bytes, max_num_batched_tokens=32, swap_space=0.01,
             tensor_parallel_size=2) as llm:
        assert llm.info.num_blocks == 48
        beams = llm.generate([p for p, _ in beam_cases], beam_params)
        mixed = llm.generate(prompts + prompts[2:], [greedy] * len(prompts) + [sampled] * len(prompts[2:]))
        stats = llm.stats()
        assert stats.num_swap_preemptions > 0 and stats.num_preemptions > stats.num_swap_preemptions
        fresh = [7 + (i * 37) % 900 for i in range(40)]
        first, second = (llm.generate([fresh], greedy)[0] for _ in range(2))
        stats = llm.stats()
        assert stats.num_free_blocks == 48 and stats.num_requests == 0 and stats.num_swapped == 0
    assert [r.outputs[0].token_ids for r in mixed[: len(prompts)]] == [hf_generate(hf, p)[0] for p in prompts]
    for r, (prompt, k) in zip(beams, beam_cases, strict=True):
        want = hf_generate(hf, prompt, num_beams=k, num_return_sequences=k, eos_token_id=None)
        assert [o.token_ids for o in r.outputs] == want
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == 36  # 9 full blocks of 4
    assert second.outputs[0].token_ids == first.outputs[0].token_ids == hf_generate(hf, fresh)[0]
    with LLM(llama, block_size=16) as one_rank:
        want = one_rank.generate(prompts[2:], sampled)
    for r, w in zip(mixed[len(prompts):], want, strict=True):
        assert [o.token_ids for o in r.outputs] == [o.token_ids for o in w.outputs]


def test_four_ranks_replicate_kv_heads(llama, prompts, hf):
    assert ModelConfig.from_dir(llama).num_kv_heads == 2  # fewer than the ranks
    with LLM(llama, block_size=16, tensor_parallel_size=4) as llm:
        got = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    assert [r.outputs[0].token_ids for r in got] == [hf_generate(hf, p)[0] for p in prompts]


def test_heads_that_do_not_split_fail_at_start(llama):
    with pytest.raises(RuntimeError) as err:
        LLM(llama, tensor_parallel_size=3, startup_timeout_s=120)
    message = str(err.value)
    assert "num_attention_heads 4 is not divisible by the tensor-parallel size 3" in message
    # refused by check_tensor_parallel before the rendezvous (its message, above; loading would fail on a
    # tensor's shape instead), as one line per process: a setting the worker cannot serve is not a bug
    assert "cannot start" in message and "Traceback" not in message


def test_a_killed_rank_ends_every_stream_unavailable(llama, tmp_path):
    svc = serve_two_ranks(llama, tmp_path)
    try:
        kill_mid_stream(svc, "worker1", max_tokens=None)
    finally:
        svc.stop()
