"""ModelConfig from config.json (+ generation_config.json) across the families' key names."""

import json

import pytest
import torch

from gpu_worker.model_config import ModelConfig
from tests.factories import make_checkpoint


def test_llama_fields(tmp_path):
    config = ModelConfig.from_dir(make_checkpoint(tmp_path, "llama", num_hidden_layers=2))
    assert (config.architecture, config.num_layers, config.num_heads, config.num_kv_heads) == (
        "LlamaForCausalLM",
        2,
        4,
        2,
    )
    assert (config.head_dim, config.hidden_size, config.vocab_size, config.max_model_len) == (16, 64, 1000, 1024)
    assert config.sliding_window is None
    assert config.hf_config["model_type"] == "llama"
    assert config.kv_bytes_per_token(torch.float32) == 2 * 2 * 2 * 16 * 4
    assert config.kv_bytes_per_token(torch.bfloat16) == 2 * 2 * 2 * 16 * 2


def test_gpt2_key_names(tmp_path):
    config = ModelConfig.from_dir(make_checkpoint(tmp_path, "gpt2", n_layer=2, n_positions=256))
    assert (config.architecture, config.num_layers, config.num_heads, config.num_kv_heads) == (
        "GPT2LMHeadModel",
        2,
        4,
        4,
    )
    assert (config.head_dim, config.hidden_size, config.max_model_len) == (16, 64, 256)


def test_eos_ids_merge_generation_config(tmp_path):
    model_dir = make_checkpoint(tmp_path, "mistral", num_hidden_layers=1, sliding_window=8)
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 1, 9]}))
    config = ModelConfig.from_dir(model_dir)
    assert config.eos_token_ids == [1, 7, 9]
    assert config.sliding_window == 8


def test_model_type_without_architectures(tmp_path):
    model_dir = make_checkpoint(tmp_path, "opt", num_hidden_layers=1)
    hf = json.loads((model_dir / "config.json").read_text())
    del hf["architectures"]
    (model_dir / "config.json").write_text(json.dumps(hf))
    assert ModelConfig.from_dir(model_dir).architecture == "OPTForCausalLM"


def test_validation():
    with pytest.raises(ValueError, match="multiple"):
        ModelConfig("LlamaForCausalLM", 1, 4, 3, 16, 64, 100, 128, [], None, {})
