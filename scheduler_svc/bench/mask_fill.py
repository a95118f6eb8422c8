"""`python -m scheduler_svc.bench.mask_fill --rows 64`: the per-step cost of constrained decoding's token
masks, before (the code of commit 49b121a: each row's bitmask filled in turn, bits unpacked with PyTorch ops) and
after (gpu_worker/grammar.py now: xgrammar's batched fill on a thread per row up to the cores or
``--threads``, its apply kernel), on the host or a GPU.

``rows`` sequences advance under the JSON schema together (by default W06's, on the demo model's
tokenizer); every step each variant fills the bitmasks of its own copy of the sequences and masks
[rows, vocab] random logits; the masked logits' argmax is every row's next token (a row that completes
starts over, so each step masks a full batch). Both variants must give the same bits and the same
masked logits at every step, or the run fails. Reported: the median over the steps of each part.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = "/work/models/smollm2"


def _rows(future, num_rows: int) -> list:
    from gpu_worker.grammar import SeqGrammar

    return [SimpleNamespace(grammar=SeqGrammar(future), token_ids=[1], num_prompt_tokens=1) for _ in range(num_rows)]


def _masks_before(states: list, vocab_size: int, eos_token_ids: list[int], threads: int | None = None):
    """token_masks as it was before the batched fill (commit 49b121a): xgrammar's allocation, each row
    filled in turn; with apply_masks_reference, the "before" of this benchmark."""
    import xgrammar as xgr

    rows = [i for i, s in enumerate(states) if s.grammar is not None]
    bitmask = xgr.allocate_token_bitmask(len(rows), vocab_size)
    for j, i in enumerate(rows):
        state = states[i]
        state.grammar.sync(state.token_ids[state.num_prompt_tokens:])
        state.grammar.fill(bitmask, j, eos_token_ids)
    return rows, bitmask


def _timed(device, fn, *args, **kwargs) -> tuple[object, float]:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, (time.perf_counter() - t0) * 1e3


def measure(model: str, schema: str, num_rows: int, steps: int, device: str, threads: int | None) -> dict:
    """Median milliseconds per step of fill and apply, before vs after."""
    import torch

    from gpu_worker.constraint import Constraint
    from gpu_worker.grammar import GrammarCache, apply_masks, apply_masks_reference, fill_threads, token_masks
    from gpu_worker.model_config import ModelConfig

    cfg = ModelConfig.from_dir(model)
    eos = cfg.eos_token_ids
    cache = GrammarCache(model, cfg.vocab_size, eos)
    future = cache.get(Constraint.json_schema(Path(schema).read_text()))
    future.result()  # compiled before the clock starts, as a warm service would have it
    threads = threads or fill_threads(num_rows)
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(0)
    variants = {"before": (_rows(future, num_rows), _masks_before, apply_masks_reference),
                "after": (_rows(future, num_rows), token_masks, apply_masks)}
    times = {name: {"fill": [], "apply": []} for name in variants}
    for step in range(steps + 2):  # the first two steps warm up (matcher creation, kernel loading)
        logits = torch.randn(num_rows, cfg.vocab_size, device=dev, generator=gen)
        results = {}
        for name, (rows, masks, apply) in variants.items():
            (idx, bitmask), fill_ms = _timed(dev, masks, rows, cfg.vocab_size, eos, threads=threads)
            fresh = logits.clone()  # apply_masks works in place
            masked, apply_ms = _timed(dev, apply, fresh, idx, bitmask)
            results[name] = (bitmask, masked)
            if step >= 2:
                times[name]["fill"].append(fill_ms)
                times[name]["apply"].append(apply_ms)
        (b0, m0), (b1, m1) = results["before"], results["after"]
        if not (torch.equal(b0, b1) and torch.equal(m0, m1)):  # every row constrained: the same layout
            raise AssertionError(f"step {step}: the masks differ from the serial ones")
        for rows, _, _ in variants.values():
            for state, token in zip(rows, m0.argmax(dim=-1).tolist(), strict=True):
                if token in eos:  # complete: start over
                    state.grammar, state.token_ids = type(state.grammar)(future), [1]
                else:
                    state.token_ids.append(token)
    cache.close()
    out = {"rows": num_rows, "steps": steps, "threads": threads, "device": device, "vocab_size": cfg.vocab_size}
    for name, t in times.items():
        fill, apply = statistics.median(t["fill"]), statistics.median(t["apply"])
        out[name] = {"fill_ms": fill, "apply_ms": apply, "total_ms": fill + apply}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64, help="constrained sequences per step")
    ap.add_argument("--steps", type=int, default=64, help="steps measured (after 2 warm-up steps)")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="model directory (its tokenizer and vocabulary)")
    ap.add_argument("--schema", default=str(HERE / "w06_schema.json"))
    ap.add_argument("--device", default="cpu", help="where the logits live: cpu or cuda")
    ap.add_argument("--threads", type=int, default=None, help="batched fill threads (default: rows, up to the cores)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    out = measure(args.model, args.schema, args.rows, args.steps, args.device, args.threads)
    print(f"mask per step, {out['rows']} rows, vocab {out['vocab_size']}, {out['device']}, "
          f"median of {out['steps']} steps:")
    for name in ("before", "after"):
        r = out[name]
        label = ("before: serial fill + PyTorch apply" if name == "before"
                 else f"after: batched fill ({out['threads']} threads) + xgrammar apply")
        print(f"  {label}: fill {r['fill_ms']:.3f} ms + apply {r['apply_ms']:.3f} ms = {r['total_ms']:.3f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
