"""`python -m scheduler_svc.bench.mask_fill --rows 64`: the per-step cost of constrained decoding's token
masks, before (each row's bitmask filled in turn, bits unpacked with PyTorch ops) and after (xgrammar's
batched fill on a thread per row up to the cores, its apply kernel), on the host or a GPU.

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


def _timed(fn, device) -> tuple[object, float]:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, (time.perf_counter() - t0) * 1e3


def measure(model: str, schema: str, num_rows: int, steps: int, device: str, threads: int | None) -> dict:
    """Median milliseconds per step of fill and apply, serial vs batched."""
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
    variants = {"serial": (_rows(future, num_rows), 1, apply_masks_reference),
                "batched": (_rows(future, num_rows), threads, apply_masks)}
    times = {name: {"fill": [], "apply": []} for name in variants}
    for step in range(steps + 2):  # the first two steps warm up (matcher creation, kernel loading)
        logits = torch.randn(num_rows, cfg.vocab_size, device=dev, generator=gen)
        results = {}
        for name, (rows, n_threads, apply) in variants.items():
            (idx, bitmask), fill_ms = _timed(lambda: token_masks(rows, cfg.vocab_size, eos, threads=n_threads), dev)
            masked, apply_ms = _timed(lambda: apply(logits.clone(), idx, bitmask), dev)
            results[name] = (bitmask, masked)
            if step >= 2:
                times[name]["fill"].append(fill_ms)
                times[name]["apply"].append(apply_ms)
        (b0, m0), (b1, m1) = results["serial"], results["batched"]
        if not (torch.equal(b0, b1) and torch.equal(m0, m1)):
            raise AssertionError(f"step {step}: the batched masks differ from the serial ones")
        for name, (rows, _, _) in variants.items():
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
    print(f"mask per step, {out['rows']} rows, vocab {out['vocab_size']}, {out['device']}, median of {out['steps']} steps:")
    for name in ("serial", "batched"):
        r = out[name]
        label = "serial fill + torch apply" if name == "serial" else f"batched fill ({out['threads']} threads) + xgrammar apply"
        print(f"  {label}: fill {r['fill_ms']:.3f} ms + apply {r['apply_ms']:.3f} ms = {r['total_ms']:.3f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
