"""Our models against transformers on the same random checkpoints: a varlen prefill through a shuffled
paged cache, decode steps, and a prompt prefilled in two chunks beside other sequences' decodes."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from gpu_worker.loader import load_model
from gpu_worker.model_config import ModelConfig
from tests.factories import MODEL_CASES as CASES
from tests.factories import PROMPT_LENS, PagedSequences, make_checkpoint, run_mixed_steps


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls run faster on one thread than on two fighting over two busy cores."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


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
    computed, ours = run_mixed_steps(model, config, block_size)

    reference = _hf_logits(model_dir, computed)
    for s, expected in reference.items():
        got = ours[s]
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
