"""lm-eval's `local-completions` model runs a multiple-choice (loglikelihood) task against the server's
/v1/completions (echo + logprobs, as lm-eval sends them), and its per-choice loglikelihoods equal
transformers' on the same fp32 checkpoint (tokenized as lm-eval tokenizes: context, then the rest of
context + choice)."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

# isort: split
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from tests.e2e.test_chat_serving import http_base  # noqa: E402
from tests.e2e.test_serving import Service  # noqa: E402
from tests.factories import make_checkpoint  # noqa: E402

pytestmark = pytest.mark.slow

QUESTIONS = [
    {"question": "The quick brown fox", "choices": [" jumps", " sleeps", " paged memory"], "answer": 0},
    {"question": "Hello, paged world", "choices": [" block table", " café", " again and again"], "answer": 1},
    {"question": "memory block", "choices": [" table", " the end"], "answer": 0},
]
TASK = """task: pagedserve_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


def hf_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """Sum of the continuation tokens' log-probabilities, tokenized as lm-eval's _encode_pair does."""
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    ctx = tok(context, add_special_tokens=False).input_ids
    with torch.inference_mode():
        lp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
    return sum(float(lp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def test_lm_eval_multiple_choice_equals_transformers(tmp_path):
    ckpt = make_checkpoint(tmp_path / "llama", max_position_embeddings=512)
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "pagedserve_mc.yaml").write_text(TASK.format(data=data))
    svc = Service(ckpt, tmp_path / "logs", "--http-port", "0")
    try:
        base = http_base(svc)
        out = tmp_path / "out"
        env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   OPENAI_API_KEY="unused")
        args = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
                f"model=llama,base_url={base}/completions,tokenizer_backend=huggingface,tokenizer={ckpt},"
                "num_concurrent=1,max_retries=1,max_length=512",
                "--tasks", "pagedserve_mc", "--include_path", str(tasks), "--output_path", str(out),
                "--log_samples", "--batch_size", "1"]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finally:
        assert svc.stop() == 0, "\n".join(svc.lines)
    (samples_file,) = out.rglob("samples_pagedserve_mc_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == len(QUESTIONS)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        q = QUESTIONS[s["doc_id"]]
        got = [float(r[0][0]) for r in s["resps"]]  # one (loglikelihood, is_greedy) per choice
        pairs = [(a["arg_0"], a["arg_1"]) for a in s["arguments"].values()]  # (context, " " + choice)
        assert [c for _, c in pairs] == [" " + c for c in q["choices"]] and len(got) == len(pairs)
        want = [hf_loglikelihood(model, tok, context, continuation) for context, continuation in pairs]
        assert got == pytest.approx(want, abs=1e-4), (q, got, want)
