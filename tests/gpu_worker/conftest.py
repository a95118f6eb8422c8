"""Fixtures of the worker tests: ``cache``, the grammar tests' GrammarCache over a tiny test checkpoint's
tokenizer, with EOS id 2 (EOS in those modules)."""

import json

import pytest

from gpu_worker.grammar import GrammarCache
from tests.factories import make_checkpoint

EOS = 2


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama")
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    c = GrammarCache(str(path), vocab, [EOS])
    yield c
    c.close()
