"""Our models against transformers on the same random checkpoints: a varlen prefill through a shuffled
paged cache, decode steps, and a prompt prefilled in two chunks beside other sequences' decodes."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from gpu_worker.loader import load_model
from gpu_worker.model_config import ModelConfig
from tests.factories import PagedSequences, make_checkpoint

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # puts head_dim 16's frequencies in all three bands
}

# case -> (demo arch, config overrides)
CASES: dict[str, tuple[str, dict]] = {
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

PROMPT_LENS = (5, 23, 40)  # seqs 0-2, prefilled together; crosses 16-token blocks
CHUNKED_LEN, FIRST_CHUNK = 29, 18  # seq 3, prefilled in two chunks


@pytest.fixture(scope="module")
def case_dirs(tmp_path_factory):
    """case -> checkpoint directory, written on first use."""
    dirs = {}

    def get(case: str):
        if case not in dirs:
            arch, overrides = CASES[case]
            dirs[case] = make_checkpoint(tmp_path_factory.mktemp(case), arch, **overrides)
        return dirs[case]

    return get


def _hf_logits(model_dir, sequences: dict[int, list[int]]) -> dict[int, torch.Tensor]:
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return {s: hf.eval()(torch.tensor([ids])).logits[0] for s, ids in sequences.items()}


@pytest.mark.parametrize("block_size", [16, 1])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(case_dirs, case, block_size):
    model_dir = case_dirs(case)
    model, config = load_model(model_dir, torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    chunked = torch.randint(3, config.vocab_size, (CHUNKED_LEN,), generator=gen).tolist()
    paged = PagedSequences(config, block_size, num_blocks=512 // block_size, seed=block_size)
    computed: dict[int, list[int]] = {s: [] for s in range(4)}  # tokens each sequence has run
    ours: dict[int, list[torch.Tensor]] = {s: [] for s in range(4)}  # their logits, in order

    def run(chunks):
        for (s, ids), logits in zip(chunks, paged.step(model, chunks), strict=True):
            computed[s] += ids
            ours[s].append(logits)

    def greedy(s):  # the next token from our own last logits
        return [int(ours[s][-1][-1].argmax())]

    run(list(enumerate(prompts)))  # one varlen prefill of three prompts
    for _ in range(2):
        run([(s, greedy(s)) for s in (0, 1, 2)])  # decode steps
    run([(0, greedy(0)), (3, chunked[:FIRST_CHUNK]), (1, greedy(1))])  # chunk 1 amid decodes
    run([(2, greedy(2)), (3, chunked[FIRST_CHUNK:])])  # chunk 2 beside a decode

    reference = _hf_logits(model_dir, computed)
    for s, expected in reference.items():
        got = torch.cat(ours[s])
        assert got.shape == expected.shape
        assert (got - expected).abs().max() < 1e-4, f"seq {s}: max abs diff {(got - expected).abs().max()}"
        assert torch.equal(got.argmax(-1), expected.argmax(-1)), f"seq {s}: greedy tokens differ"


def test_sliding_window_is_exercised(case_dirs):
    """The window case must differ from full attention, or its test proves nothing."""
    model_dir = case_dirs("mistral_window8")
    config = ModelConfig.from_dir(model_dir)
    assert config.sliding_window == 8 < max(PROMPT_LENS)
    windowed, _ = load_model(model_dir, torch.device("cpu"), torch.float32)
    for layer in windowed.layers:
        layer.self_attn.sliding_window = None
    ids = list(range(3, 3 + max(PROMPT_LENS)))
    full = PagedSequences(config, 16, 16).step(windowed, [(0, ids)])[0]
    assert (full[-1] - _hf_logits(model_dir, {0: ids})[0][-1]).abs().max() > 1e-2


def test_qwen2_windows_only_late_layers(case_dirs):
    model, config = load_model(case_dirs("qwen2_window_layers"), torch.device("cpu"), torch.float32)
    assert [layer.self_attn.sliding_window for layer in model.layers] == [None, 8, 8]
    assert config.sliding_window is None  # not every layer slides: no KV is dead


def test_missing_tensor_is_named(tmp_path):
    model_dir = make_checkpoint(tmp_path, "llama", num_hidden_layers=2)
    weights = load_file(model_dir / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.weight"]
    save_file(weights, model_dir / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(model_dir, torch.device("cpu"), torch.float32)


def test_unexpected_tensor_is_named(tmp_path):
    model_dir = make_checkpoint(tmp_path, "llama", num_hidden_layers=2)
    weights = load_file(model_dir / "model.safetensors")
    weights["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(weights, model_dir / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.extra\.weight"):
        load_model(model_dir, torch.device("cpu"), torch.float32)


def test_unknown_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"], "model_type": "foo"}))
    with pytest.raises(ValueError, match="FooForCausalLM") as err:
        load_model(tmp_path, torch.device("cpu"), torch.float32)
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel", "OPTForCausalLM"):
        assert name in str(err.value)


def test_no_weights_is_an_error(tmp_path):
    model_dir = make_checkpoint(tmp_path, "llama", num_hidden_layers=1)
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(model_dir, torch.device("cpu"), torch.float32)
