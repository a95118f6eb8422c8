"""GGUF checkpoints: which path is one, config and tokenizer from metadata as transformers reads them,
weights equal to the HF checkpoint they were written from (F32) and to transformers' own GGUF loading
(mixed types), clear errors for what we cannot load."""

import dataclasses

import gguf
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from gpu_worker.gguf_loader import hf_tensor_name
from gpu_worker.loader import load_model
from gpu_worker.model_config import ModelConfig
from gpu_worker.model_files import resolve_model
from scheduler_svc.gateway.tokenizer import Tokenizer, has_tokenizer
from tests.factories import make_checkpoint, run_mixed_steps
from tests.gguf_files import FAMILIES, TEXTS, Q, mixed_plan, write_gguf


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(family, plan) -> (HF directory, GGUF file), written on first use."""
    written = {}

    def get(family: str, plan: str = "f32"):
        if family not in written:
            written[family] = make_checkpoint(tmp_path_factory.mktemp(family), family, **FAMILIES[family])
        if (family, plan) not in written:
            out = tmp_path_factory.mktemp(f"{family}-{plan}") / f"{family}-{plan}.gguf"
            write_gguf(written[family], out, mixed_plan if plan == "mixed" else lambda name: Q.F32, family)
            written[family, plan] = out
        return written[family], written[family, plan]

    return get


def test_resolve_model(tmp_path, files):
    hf_dir, gguf_file = files("llama")
    assert resolve_model(hf_dir).gguf_file is None
    assert resolve_model(gguf_file).gguf_file == gguf_file
    assert resolve_model(gguf_file.parent).gguf_file == gguf_file  # a directory holding one
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match=r"several \.gguf files \(a\.gguf, b\.gguf\): name one"):
        resolve_model(tmp_path)
    with pytest.raises(ValueError, match="not a .gguf checkpoint"):
        resolve_model(hf_dir / "config.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json and no .gguf file"):
        resolve_model(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(tmp_path / "missing")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_config_as_transformers_reads_it(files, family):
    hf_dir, gguf_file = files(family)
    ours = ModelConfig.from_dir(gguf_file)
    theirs = AutoConfig.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).to_dict()
    assert ours.gguf_file == gguf_file and ours.hf_config["model_type"] == family
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # names, paths
    assert public(ours.hf_config) == public(theirs)
    # what the runner reads agrees with the checkpoint the file was written from (== ignores hf_config)
    assert dataclasses.replace(ours, gguf_file=None) == ModelConfig.from_dir(hf_dir)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_f32_weights_equal_the_checkpoint_written(files, family):
    """Names, shapes and the undone Q/K permutation: an F32 GGUF loads to exactly the HF weights."""
    hf_dir, gguf_file = files(family)
    from_gguf, _ = load_model(gguf_file, torch.device("cpu"), torch.float32)
    from_hf, _ = load_model(hf_dir, torch.device("cpu"), torch.float32)
    ours, want = dict(from_gguf.named_parameters()), dict(from_hf.named_parameters())
    assert ours.keys() == want.keys()
    for name, param in ours.items():
        assert torch.equal(param, want[name]), name


@pytest.mark.parametrize("family", list(FAMILIES))
def test_mixed_types_match_transformers_gguf_loading(files, family):
    _, gguf_file = files(family, "mixed")
    types = {t.tensor_type for t in gguf.GGUFReader(gguf_file).tensors}
    assert {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K} <= types
    model, config = load_model(gguf_file, torch.device("cpu"), torch.float32)
    computed, ours = run_mixed_steps(model, config, 16)
    hf = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    with torch.no_grad():
        for s, ids in computed.items():
            want = hf(torch.tensor([ids])).logits[0]
            assert (ours[s] - want).abs().max() < 1e-4, f"seq {s}"
            assert torch.equal(ours[s].argmax(-1), want.argmax(-1)), f"seq {s}"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tokenizer_ids_equal_transformers(files, family):
    _, gguf_file = files(family)
    theirs = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    ours = Tokenizer(gguf_file)
    assert has_tokenizer(gguf_file) and ours.vocab_size == len(theirs)
    for text in TEXTS:
        ids = theirs(text).input_ids
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text


def test_directory_tokenizer_json_wins(files, tmp_path):
    """A directory holding the GGUF and a tokenizer.json (demo-model --trained) reads the json."""
    _, gguf_file = files("llama")
    (tmp_path / gguf_file.name).symlink_to(gguf_file)
    Tokenizer(gguf_file)._tok.save(str(tmp_path / "tokenizer.json"))
    converted = Tokenizer(gguf_file)
    from_json = Tokenizer(tmp_path)
    assert from_json._tok.to_str() == converted._tok.to_str()
    for text in TEXTS:
        assert from_json.encode(text) == converted.encode(text)


def test_unsupported_tensor_type_is_named(files, tmp_path):
    """A tensor of a type we cannot dequantize fails the load before any weight, naming both."""
    hf_dir, _ = files("llama")
    plan = lambda name: Q.IQ4_NL if name == "blk.1.attn_v.weight" else Q.F32
    write_gguf(hf_dir, tmp_path / "iq.gguf", plan)
    with pytest.raises(ValueError, match=r"iq\.gguf: tensor blk\.1\.attn_v\.weight has GGML type IQ4_NL, which "
                                         r"cannot be dequantized \(supported: F32, F16, BF16, Q8_0"):
        load_model(tmp_path / "iq.gguf", torch.device("cpu"), torch.float32)


def test_unsupported_architecture_is_named(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"gpt2\.gguf: GGUF architecture 'gpt2' is not supported; "
                                         r"supported: llama, qwen2, qwen3"):
        ModelConfig.from_dir(tmp_path / "gpt2.gguf")


def test_tensor_names():
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("blk.12.attn_k.bias") == "model.layers.12.self_attn.k_proj.bias"
    assert hf_tensor_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert hf_tensor_name("rope_freqs.weight") is None
    with pytest.raises(ValueError, match="'blk.0.ffn_gate_exps.weight' has no Hugging Face name"):
        hf_tensor_name("blk.0.ffn_gate_exps.weight")
