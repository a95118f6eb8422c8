"""Text side of the service (gateway and offline API): the model's tokenizer.

A Hugging Face directory brings a ``tokenizer.json``. A GGUF checkpoint brings its vocabulary and merges
as metadata, which transformers converts into a ``tokenizers`` tokenizer (``AutoTokenizer`` with
``gguf_file``); we keep that tokenizer, so ids are transformers' by construction. Transformers imports
torch, which the gateway must not: the conversion runs in a child process (gpu_worker.gguf_tokenizer).
It reads the whole metadata and takes seconds, so a directory holding a GGUF file and a
``tokenizer.json`` (what ``pagedserve demo-model --trained`` writes) uses the ``tokenizer.json``.
"""

from __future__ import annotations

import functools
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from gpu_worker.model_files import resolve_model


def _tokenizer_json(model: str | Path) -> Path | None:
    """The tokenizer.json the model's directory holds, if any (a .gguf file given alone: none)."""
    path = Path(model)
    return path / "tokenizer.json" if path.is_dir() and (path / "tokenizer.json").exists() else None


def has_tokenizer(model: str | Path) -> bool:
    """Whether the model brings a tokenizer: a GGUF checkpoint always does, a directory if it holds a
    tokenizer.json (a benchmark's config.json-only directory does not)."""
    return _tokenizer_json(model) is not None or resolve_model(model).gguf_file is not None


class Tokenizer:
    """Thin wrapper over ``tokenizers``: the model directory's ``tokenizer.json``, else (GGUF) the one
    converted from the file's metadata."""

    def __init__(self, model: str | Path) -> None:
        path = _tokenizer_json(model)
        if path is not None:
            self._tok = _HFTokenizer.from_file(str(path))
        elif (gguf_file := resolve_model(model).gguf_file) is not None:
            from gpu_worker.gguf_tokenizer import load_gguf_tokenizer  # transformers: in a child process

            self._tok = load_gguf_tokenizer(gguf_file)
        else:
            raise FileNotFoundError(f"{Path(model) / 'tokenizer.json'} not found: the model directory needs a "
                                    "tokenizer.json")
        self.vocab_size = self._tok.get_vocab_size()

    @property
    def backend(self) -> _HFTokenizer:
        """The ``tokenizers.Tokenizer`` itself (the gateway's streaming detokenizer steps through it)."""
        return self._tok

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``add_special_tokens=False`` for text that spells its special tokens out (a rendered chat
        template), as transformers' apply_chat_template tokenizes it."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_releasing_gil(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``encode``, for a worker thread: ``tokenizers`` holds the GIL in encode but releases it in
        encode_batch, so only this form lets the event loop run meanwhile."""
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """UTF-8 length of the longest vocabulary entry: one token covers about that much text at most."""
        return max(len(token.encode("utf-8")) for token in self._tok.get_vocab(with_added_tokens=True))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)
