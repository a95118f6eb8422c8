"""The model a serving benchmark runs against: a random-weight shape needs a tokenizer for the gateway,
and the workload needs the vocabulary size (from the checkpoint, the shape or the running service)."""

from __future__ import annotations

from pathlib import Path

from scheduler_svc.bench.throughput import SHAPES


def write_placeholder_tokenizer(model_dir: Path, vocab_size: int) -> None:
    """A word-level tokenizer.json whose token i spells ``<i>``, so the gateway can detokenize random
    ids of a random-weight shape (detokenization cost included in the measurement)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    tok = Tokenizer(WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.save(str(model_dir / "tokenizer.json"))



def vocab_size(args, model_dir: Path) -> int:
    if args.model:
        from gpu_worker.model_config import hf_config

        return hf_config(model_dir)["vocab_size"]
    if args.shape:
        return SHAPES[args.shape]["vocab_size"]
    import clients  # noqa: F401
    from pagedserve.client import Client

    with Client(args.target) as client:
        client.wait_ready(timeout=900)
        return client.model_info().vocab_size
