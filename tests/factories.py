"""Small builders the tests share: demo checkpoints and a toy paged runner for model tests."""

import random
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
        logits = model.compute_logits(model(input_ids, positions, self.kv_caches, meta))
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
