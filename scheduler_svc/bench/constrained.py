"""`bench throughput --json-schema FILE`: the cost of constrained decoding.

Runs the workload twice through the offline engine, unconstrained and with every request under the
schema (same prompts, same max_tokens, greedy), then measures the per-step mask cost alone at the
batch size: ``batch`` matchers advancing together, each step filling their bitmasks on the host and
applying them to [batch, vocab] logits on the device (what the worker adds to a constrained step).

Random-weight shapes have no tokenizer: the grammar then compiles against a synthetic byte-level
vocabulary of the shape's size (gpu_worker/grammar.py), which has the same mask sizes and a realistic
mix of token lengths. A constrained request ends when its grammar is complete, so the two runs'
output token counts differ; throughput is compared in output tokens per second.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def run_constrained(engine, work, warm, schema_file: str, batch: int) -> list[dict]:
    from gpu_worker.constraint import Constraint
    from gpu_worker.sampling_params import SamplingParams
    from scheduler_svc.llm import LLM

    constraint = Constraint.json_schema(Path(schema_file).read_text())
    constraint.check()
    rows = []
    with LLM(engine) as llm:
        llm.generate(warm.prompts, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        for name, c in (("unconstrained", None), ("json_schema", constraint)):
            params = [SamplingParams(max_tokens=n, temperature=0.0, constraint=c) for n in work.output_lens]
            if c is not None:  # compile before the clock starts, as a warm service would have
                llm.generate(warm.prompts[:1], SamplingParams(max_tokens=2, temperature=0.0, constraint=c))
            t0 = time.perf_counter()
            results = llm.generate(work.prompts, params)
            seconds = time.perf_counter() - t0
            produced = sum(len(r.outputs[0].token_ids) for r in results)
            rows.append({"run": name, "seconds": seconds, "output_tokens": produced,
                         "output_tok_s": produced / seconds})
            print(f"{name}: {produced} output tokens in {seconds:.2f} s = {produced / seconds:.0f} tok/s", flush=True)
    mask = mask_step_cost(engine.model, engine.device, constraint, batch)
    print(f"mask per step at batch {batch}: fill {mask['fill_ms']:.3f} ms (host) + apply {mask['apply_ms']:.3f} ms "
          f"(device) = {mask['total_ms']:.3f} ms", flush=True)
    rows.append(dict(run="mask_step", batch=batch, **mask))
    return rows


def mask_step_cost(model_dir: str, device: str, constraint, batch: int, steps: int = 64) -> dict:
    """Mean host fill and device apply time of one step's masks for ``batch`` sequences."""
    import torch

    from gpu_worker.grammar import GrammarCache, SeqGrammar, apply_masks, token_masks
    from gpu_worker.model_config import ModelConfig

    cfg = ModelConfig.from_dir(model_dir)
    cache = GrammarCache(model_dir, cfg.vocab_size, cfg.eos_token_ids)
    future = cache.get(constraint)
    future.result()

    class _Seq:
        __slots__ = ("grammar", "token_ids", "num_prompt_tokens")

    seqs = []
    for _ in range(batch):
        s = _Seq()
        s.grammar, s.token_ids, s.num_prompt_tokens = SeqGrammar(future), [1], 1
        seqs.append(s)
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(0)
    fill = apply = 0.0
    for _ in range(steps):
        logits = torch.randn(batch, cfg.vocab_size, device=dev, generator=gen)
        sync(dev)
        t0 = time.perf_counter()
        masks = token_masks(seqs, cfg.vocab_size, cfg.eos_token_ids)
        t1 = time.perf_counter()
        chosen = apply_masks(logits, *masks).argmax(dim=-1)
        sync(dev)
        t2 = time.perf_counter()
        fill, apply = fill + t1 - t0, apply + t2 - t1
        eos = set(cfg.eos_token_ids)
        for s, token in zip(seqs, chosen.tolist(), strict=True):
            if token in eos:  # complete: start over, so that every step masks a full batch
                s.grammar, s.token_ids = SeqGrammar(future), [1]
            else:
                s.token_ids.append(token)
    cache.close()
    return {"fill_ms": fill / steps * 1e3, "apply_ms": apply / steps * 1e3, "total_ms": (fill + apply) / steps * 1e3}


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write(out: str | None, rows: list[dict]) -> None:
    if out:
        Path(out).write_text(json.dumps({"constrained": rows}, indent=1))
