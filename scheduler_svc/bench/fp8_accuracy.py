"""``python -m scheduler_svc.bench.fp8_accuracy``: what FP8 costs in accuracy, on a trained model.

A small Llama (the demo checkpoint's family and tokenizer, gpu_worker/demo_model.py, widened) is trained
here with transformers in fp32 on the demo corpus's text, lines 0..N-H; lines N-H..N, never trained on,
are the held-out text. Then our engine's model, loaded from the saved checkpoint in the serving dtype
(bf16 on CUDA, fp32 on CPU, where fp8 is emulated), runs four ways: as is, with fp8 weights
(``--quantization fp8``), with an fp8 KV cache (``--kv-cache-dtype fp8``) and with both. For each:

- teacher-forced perplexity over the held-out text, cut into chunks of ``--chunk`` tokens, each chunk one
  prefill (its attention reads K and V back from the paged cache, so an fp8 cache counts);
- teacher-forced top-1 agreement: the share of held-out positions whose argmax equals the unquantized
  model's;
- greedy continuations of ``--gen`` tokens from the first ``--prompt`` tokens of each chunk, decoded one
  token per step through the paged cache, compared with the unquantized model's: the share of positions
  before the first divergence (1.0: identical), averaged over the prompts.

The targets (issue 25): each perplexity within 2% of the unquantized model's.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from gpu_worker.attention_metadata import AttentionMetadata
from gpu_worker.kv_pool import KVPool
from gpu_worker.loader import load_model

MODES = {"base": ("none", "auto"), "fp8 weights": ("fp8", "auto"), "fp8 KV": ("none", "fp8"),
         "fp8 weights + KV": ("fp8", "fp8")}
SHAPE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, max_position_embeddings=1024, initializer_range=0.02)


def corpus_ids(num_lines: int) -> list[list[int]]:
    from tokenizers import Tokenizer

    from gpu_worker.demo_model import _corpus, _tokenizer_json

    tok = Tokenizer.from_str(_tokenizer_json())
    return [tok.encode(line + "\n").ids for line in _corpus(num_lines)]


def chunks(lines: list[list[int]], size: int) -> torch.Tensor:
    stream = [t for line in lines for t in line]
    n = len(stream) // size
    return torch.tensor(stream[: n * size]).view(n, size)


def train(path: Path, data: torch.Tensor, device: str, steps: int, batch: int, seed: int) -> float:
    """Trains the checkpoint at ``path`` in place (fp32, AdamW, cosine decay); returns the last loss."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").to(device)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, steps)
    gen = torch.Generator().manual_seed(seed)
    data = data.to(device)
    loss = torch.zeros(())
    for _ in range(steps):
        ids = data[torch.randint(len(data), (batch,), generator=gen).to(device)]
        loss = model(input_ids=ids, labels=ids).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        sched.step()
    model.to("cpu").save_pretrained(path)
    return loss.item()


class MiniRunner:
    """One KV pool, each sequence its own run of blocks: prefill and decode steps of a fixed batch."""

    def __init__(self, model, config, num_seqs: int, max_len: int, kv_dtype: torch.dtype, device, block=16):
        self.model, self.block, self.device = model, block, device
        self.per_seq = -(-max_len // block)
        self.pool = KVPool(config.num_layers, num_seqs * self.per_seq, block, config.num_kv_heads, config.head_dim,
                           kv_dtype, device)
        self.tables = torch.arange(num_seqs * self.per_seq, dtype=torch.int32, device=device).view(num_seqs, -1)
        self.lens = [0] * num_seqs

    @torch.inference_mode()
    def step(self, tokens: list[list[int]]) -> torch.Tensor:  # tokens per sequence -> logits [T, vocab] fp32
        ids, pos, slots, starts = [], [], [], [0]
        for s, toks in enumerate(tokens):
            for i, t in enumerate(toks):
                p = self.lens[s] + i
                ids.append(t)
                pos.append(p)
                slots.append((s * self.per_seq + p // self.block) * self.block + p % self.block)
            self.lens[s] += len(toks)
            starts.append(starts[-1] + len(toks))
        dev = self.device
        meta = AttentionMetadata(torch.tensor(slots, device=dev), self.tables,
                                 torch.tensor(self.lens, dtype=torch.int32, device=dev),
                                 torch.tensor(starts, dtype=torch.int32, device=dev),
                                 max(len(t) for t in tokens), max(self.lens))
        hidden = self.model(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), self.pool.caches, meta)
        return self.model.compute_logits(hidden).float()


def evaluate(path: Path, mode: str, held: torch.Tensor, args, device: torch.device, dtype: torch.dtype) -> dict:
    quant, kv = MODES[mode]
    model, config = load_model(path, device, dtype, quantization=quant)
    kv_dtype = torch.float8_e4m3fn if kv == "fp8" else dtype
    n, size = held.shape
    # Perplexity: every chunk one prefill, all in one step.
    runner = MiniRunner(model, config, n, size, kv_dtype, device)
    logits = runner.step(held.tolist()).view(n, size, -1)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                            held[:, 1:].reshape(-1).to(device))
    top1 = logits[:, :-1].argmax(-1).cpu()
    # Greedy continuations, one decode step at a time.
    runner = MiniRunner(model, config, n, args.prompt + args.gen, kv_dtype, device)
    last = runner.step(held[:, : args.prompt].tolist()).view(n, args.prompt, -1)[:, -1]
    out = []
    for _ in range(args.gen):
        nxt = last.argmax(-1)
        out.append(nxt.cpu())
        last = runner.step([[t] for t in nxt.tolist()])
    del model, runner
    return {"ppl": math.exp(float(nll)), "greedy": torch.stack(out, 1).tolist(), "top1": top1}


def agreement(got: list[list[int]], want: list[list[int]]) -> float:
    """Mean over prompts of (positions before the first divergence) / length."""
    shares = []
    for g, w in zip(got, want, strict=True):
        first = next((i for i, (a, b) in enumerate(zip(g, w, strict=True)) if a != b), len(w))
        shares.append(first / len(w))
    return sum(shares) / len(shares)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 600 on CUDA, 200 on CPU)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--chunk", type=int, default=128, help="tokens per held-out chunk")
    p.add_argument("--held-out", type=int, default=400, help="held-out corpus lines")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--gen", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    steps = args.steps or (600 if device.type == "cuda" else 200)
    from gpu_worker.demo_model import write_demo_model

    lines = corpus_ids(3000)
    train_data, held = chunks(lines[: -args.held_out], args.chunk), chunks(lines[-args.held_out:], args.chunk)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_demo_model(Path(tmp) / "m", "llama", seed=args.seed, **SHAPE)
        loss = train(path, train_data, args.device, steps, args.batch, args.seed)
        print(f"trained {steps} steps on {len(train_data)} chunks of {args.chunk} tokens: last loss {loss:.3f} "
              f"({time.perf_counter() - t0:.0f} s); held out: {held.shape[0]} chunks", flush=True)
        results = {mode: evaluate(path, mode, held, args, device, dtype) for mode in MODES}
    base = results["base"]
    print(f"\n{device.type}, serving dtype {str(dtype).removeprefix('torch.')}"
          f"{' (fp8 emulated)' if device.type != 'cuda' else ''}")
    print(f"{'mode':<18} {'held-out ppl':>13} {'vs base':>9} {'top-1 agreement':>16} {'greedy agreement':>17}")
    rows = []
    for mode, r in results.items():
        rel = r["ppl"] / base["ppl"] - 1
        agree = agreement(r["greedy"], base["greedy"])
        top1 = (r["top1"] == base["top1"]).float().mean().item()
        rows.append({"mode": mode, "ppl": r["ppl"], "rel": rel, "top1_agreement": top1, "greedy_agreement": agree})
        print(f"{mode:<18} {r['ppl']:>13.3f} {100 * rel:>+8.2f}% {100 * top1:>15.1f}% {100 * agree:>16.1f}%")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": args.device, "dtype": str(dtype), "steps": steps,
                                              "loss": loss, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
