"""Small builders the tests share: demo checkpoints and a toy paged runner for model tests."""

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gpu_worker.attention_metadata import AttentionMetadata
from gpu_worker.demo_model import write_demo_model
from gpu_worker.model_config import ModelConfig

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # puts head_dim 16's frequencies in all three bands
}

# Model test cases: name -> (demo arch, config overrides); each one a family or a variant of one.
MODEL_CASES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "llama_tied_biases": ("llama", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
    "llama3_rope": ("llama", {"rope_parameters": LLAMA3_ROPE}),
    "mistral_window8": ("mistral", {"sliding_window": 8}),
    "qwen2": ("qwen2", {}),
    "qwen2_window_layers": ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    "qwen3": ("qwen3", {}),
    "gpt2": ("gpt2", {}),
    "gpt_neox": ("gpt_neox", {}),
    "gpt_neox_sequential": ("gpt_neox", {"use_parallel_residual": False, "rotary_pct": 0.5}),
    "opt": ("opt", {}),
    "opt_post_ln_projected": ("opt", {"do_layer_norm_before": False, "word_embed_proj_dim": 32}),
}


def make_checkpoint(path: str | Path, arch: str = "llama", **overrides) -> Path:
    """A tiny random checkpoint with the demo tokenizer (see gpu_worker.demo_model)."""
    return write_demo_model(path, arch, **overrides)


@dataclass(frozen=True)
class TrainedCheckpoint:
    """What make_trained_checkpoint wrote and how well the saved weights memorized their passages."""

    path: Path
    passages: list[list[int]]
    accuracy: float  # teacher-forced next-token accuracy over every passage position, fp32
    median_margin: float  # median top-1 minus top-2 logit over those positions
    min_margin: float  # the smallest such gap where the top-1 is the passage's token (0.0 if none is)
    loss: float  # cross-entropy of the last training step
    train_seconds: float  # the training loop alone

    def prompts(self, num_prompts: int, max_tokens: int, min_len: int = 4, seed: int = 0) -> list[list[int]]:
        """Prefixes of passages 0, 1, ... (num_prompts of them, cycling) of seeded lengths in
        [min_len, passage_len - max_tokens], so that max_tokens greedy tokens continue memorized text."""
        rng = random.Random(seed)
        top = len(self.passages[0]) - max_tokens
        if top < min_len:
            raise ValueError(f"passages of {len(self.passages[0])} tokens leave no prefix for {max_tokens} tokens")
        return [self.passages[i % len(self.passages)][: rng.randint(min_len, top)] for i in range(num_prompts)]


def make_trained_checkpoint(
    path: str | Path,
    arch: str = "llama",
    *,
    device: str | torch.device = "cpu",
    steps: int = 150,
    num_passages: int = 16,
    passage_len: int = 128,
    batch_size: int | None = None,
    lr: float = 3e-3,
    seed: int = 0,
    **overrides,
) -> TrainedCheckpoint:
    """The demo checkpoint of ``arch`` (make_checkpoint with ``seed`` and ``overrides``), trained in place
    to memorize ``num_passages`` seeded passages of ``passage_len`` random token ids in [3, vocab).

    Random weights leave top-1/top-2 logit gaps the size of bf16 rounding, so two correct bf16 engines part
    ways on them; a trained model is confident where it has learned. Random ids carry no pattern: to
    continue a passage the model must find where it is from the tokens before, i.e. use attention.

    Training: transformers' own model in fp32 on ``device``, dropout off (eval mode), AdamW (no weight
    decay) at a constant ``lr`` for ``steps`` steps on next-token cross-entropy, full batch or
    ``batch_size`` passages per step in a seeded order. The weights are saved back with save_pretrained:
    the same safetensors names, shapes and dtypes (tied embeddings stay tied), config files unchanged.
    The figures returned are measured on the checkpoint as saved, reloaded. Deterministic under ``seed``
    on CPU; on CUDA up to the order of atomic adds in the backward pass.
    """
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    path = make_checkpoint(path, arch, seed=seed, **overrides)
    device = torch.device(device)
    configs = {name: (path / name).read_bytes() for name in ("config.json", "generation_config.json")}

    def layout() -> dict[str, tuple]:
        with safe_open(path / "model.safetensors", "pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}

    before = layout()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    model.to(device).eval()  # eval: no dropout (gpt2, opt); gradients flow all the same
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(3, vocab, (num_passages, passage_len), generator=gen)
    batch = min(batch_size or num_passages, num_passages)
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    data_dev = data.to(device)

    def batches(source: torch.Tensor):  # each epoch the passages in a fresh seeded order, `batch` at a time
        while True:
            perm = torch.randperm(num_passages, generator=gen).to(device)
            for i in range(0, num_passages - batch + 1, batch):
                yield source[perm[i: i + batch]]

    start = time.perf_counter()
    for _, ids in zip(range(steps), batches(data_dev), strict=False):
        logits = model(input_ids=ids).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
    loss_value = loss.item()  # waits for the device
    seconds = time.perf_counter() - start
    model.to("cpu").save_pretrained(path)
    del model, optim, ids, logits, loss, data_dev
    if layout() != before or any((path / n).read_bytes() != b for n, b in configs.items()):
        raise AssertionError(f"{arch}: save_pretrained changed the checkpoint's layout or config")

    return _measure_saved(path, data, device, batch, loss=loss_value, train_seconds=seconds)


def _measure_saved(path: Path, data: torch.Tensor, device: torch.device, batch: int, **trained) -> TrainedCheckpoint:
    """Reloads the checkpoint as saved and measures how well it continues each passage (top-1 accuracy
    and the top-1/top-2 logit margins)."""
    from transformers import AutoModelForCausalLM

    data_dev = data.to(device)
    saved = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    saved.to(device).eval()
    with torch.inference_mode():
        logits = torch.cat([saved(input_ids=data_dev[i: i + batch]).logits[:, :-1].float().cpu()
                            for i in range(0, len(data), batch)])
    del saved, data_dev
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the engine's worker sizes its KV pool from the GPU's free memory
    targets = data[:, 1:]
    top2 = logits.topk(2, dim=-1)
    hit = top2.indices[..., 0] == targets
    margin = top2.values[..., 0] - top2.values[..., 1]
    return TrainedCheckpoint(
        path=path,
        passages=data.tolist(),
        accuracy=hit.float().mean().item(),
        median_margin=margin.median().item(),
        min_margin=margin[hit].min().item() if hit.any() else 0.0,
        **trained,
    )


class PagedSequences:
    """The runner's bookkeeping in miniature: a KV pool whose blocks are handed out in shuffled order,
    a block table and a computed-token count per sequence, and the AttentionMetadata of one step.

    Unwritten cache slots hold NaN, so attention that reads a slot it must not shows up in the output.
    """

    def __init__(
        self,
        config: ModelConfig,
        block_size: int,
        num_blocks: int,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ):
        self.block_size = block_size
        self.device = torch.device(device)
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.kv_caches = [
            (
                torch.full(shape, float("nan"), dtype=dtype, device=self.device),
                torch.full(shape, float("nan"), dtype=dtype, device=self.device),
            )
            for _ in range(config.num_layers)
        ]
        self.free_block_ids = list(range(num_blocks))
        random.Random(seed).shuffle(self.free_block_ids)
        self.block_tables: dict[int, list[int]] = {}
        self.num_computed_tokens: dict[int, int] = {}

    def prepare(self, chunks: list[tuple[int, list[int]]]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Inputs of one step in which sequence ``seq_id`` computes ``token_ids`` next, per chunk."""
        input_ids, positions, slots, seq_lens, starts = [], [], [], [], [0]
        for seq_id, token_ids in chunks:
            start = self.num_computed_tokens.setdefault(seq_id, 0)
            table = self.block_tables.setdefault(seq_id, [])
            seq_len = start + len(token_ids)
            while len(table) * self.block_size < seq_len:
                table.append(self.free_block_ids.pop())
            for pos in range(start, seq_len):
                slots.append(table[pos // self.block_size] * self.block_size + pos % self.block_size)
            input_ids += token_ids
            positions += range(start, seq_len)
            seq_lens.append(seq_len)
            starts.append(starts[-1] + len(token_ids))
            self.num_computed_tokens[seq_id] = seq_len
        tables = [self.block_tables[seq_id] for seq_id, _ in chunks]
        width = max(len(t) for t in tables)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            max_query_len=max(len(ids) for _, ids in chunks),
            max_seq_len=max(seq_lens),
        )
        return torch.tensor(input_ids, device=dev), torch.tensor(positions, device=dev), meta

    @torch.inference_mode()
    def step(self, model: torch.nn.Module, chunks: list[tuple[int, list[int]]]) -> list[torch.Tensor]:
        """Run one step; returns each chunk's logits [len(token_ids), vocab] (fp32)."""
        input_ids, positions, meta = self.prepare(chunks)
        logits = model.compute_logits(model(input_ids, positions, self.kv_caches, meta)).float()
        return list(logits.split([len(ids) for _, ids in chunks]))


PROMPT_LENS = (5, 23, 40)  # run_mixed_steps' seqs 0-2, prefilled together; they cross 16-token blocks
CHUNKED_LEN, FIRST_CHUNK = 29, 18  # its seq 3, prefilled in two chunks


def run_mixed_steps(
    model: torch.nn.Module,
    config: ModelConfig,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[dict[int, list[int]], dict[int, torch.Tensor]]:
    """The step shapes a runner produces, on random prompts: three prompts prefilled in one varlen
    step, two decode steps (greedy on our own logits), then a fourth prompt prefilled in two chunks,
    each beside other sequences' decodes. Returns per sequence the tokens it ran and our logits for
    them, [num_tokens, vocab] fp32 on the CPU, row i predicting token i + 1."""
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    chunked = torch.randint(3, config.vocab_size, (CHUNKED_LEN,), generator=gen).tolist()
    paged = PagedSequences(config, block_size, 512 // block_size, dtype, seed=block_size, device=device)
    computed: dict[int, list[int]] = {s: [] for s in range(4)}
    logits: dict[int, list[torch.Tensor]] = {s: [] for s in range(4)}

    def run(chunks):
        for (s, ids), rows in zip(chunks, paged.step(model, chunks), strict=True):
            computed[s] += ids
            logits[s].append(rows.cpu())

    def greedy(s):
        return [int(logits[s][-1][-1].argmax())]

    run(list(enumerate(prompts)))
    for _ in range(2):
        run([(s, greedy(s)) for s in (0, 1, 2)])
    run([(0, greedy(0)), (3, chunked[:FIRST_CHUNK]), (1, greedy(1))])
    run([(2, greedy(2)), (3, chunked[FIRST_CHUNK:])])
    return computed, {s: torch.cat(rows) for s, rows in logits.items()}


def hf_greedy(path: str | Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' own greedy continuation of each prompt (fp32, CPU, one prompt at a time)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=model.config.eos_token_id)
            outs.append(gen[0, len(p):].tolist())
    return outs


def random_prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def hf_greedy_logprobs(
    path: str | Path, prompts: list[list[int]], max_tokens: int, dtype: torch.dtype, device: str = "cuda"
) -> list[tuple[list[int], list[float]]]:
    """transformers' greedy tokens (sdpa, ``dtype`` on ``device``, one prompt at a time) and the
    log-softmax of its logits at them. EOS neither stops nor is suppressed, as in the engine's
    ignore_eos: min_new_tokens would mask EOS out of the logits, so where a checkpoint's argmax is EOS
    transformers would take the runner-up and the two would part ways there."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device=device)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 eos_token_id=None, do_sample=False, output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=0)
            tokens = gen.sequences[0, len(p):].tolist()
            assert len(tokens) == max_tokens, f"transformers stopped after {len(tokens)} tokens"
            lps = [torch.log_softmax(step[0].float(), -1)[t].item()
                   for step, t in zip(gen.logits, tokens, strict=True)]
            outs.append((tokens, lps))
    del model
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return outs


def engine_greedy_logprobs(
    path: str | Path, prompts: list[list[int]], max_tokens: int, dtype: str, device: str = "cuda", **llm_args
) -> list[tuple[list[int], list[float]]]:
    """The engine's (scheduler_svc.LLM) greedy tokens and logprobs, EOS ignored, all prompts submitted
    together; ``llm_args`` go to LLM (max_num_seqs defaults to the number of prompts)."""
    from scheduler_svc import LLM, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=True)
    llm_args.setdefault("max_num_seqs", len(prompts))
    with LLM(path, device=device, dtype=dtype, **llm_args) as llm:
        return [(r.outputs[0].token_ids, r.outputs[0].logprobs) for r in llm.generate(prompts, params)]


def compare_greedy(got, want) -> tuple[int, int, int, float]:
    """(first tokens equal, positions equal, positions, worst logprob gap) between two lists of
    (tokens, logprobs). The logprob gap is taken at every position whose prefix both share, up to and
    including the first where the tokens differ (each side's logprob of its own token there), so it bounds
    the gap wherever the tokens agree; later positions condition on different prefixes."""
    first = equal = total = 0
    worst = 0.0
    for (g_tok, g_lp), (w_tok, w_lp) in zip(got, want, strict=True):
        first += g_tok[0] == w_tok[0]
        equal += sum(a == b for a, b in zip(g_tok, w_tok, strict=True))
        total += len(w_tok)
        for i, (a, b) in enumerate(zip(g_tok, w_tok, strict=True)):
            worst = max(worst, abs(g_lp[i] - w_lp[i]))
            if a != b:
                break
    return first, equal, total, worst
