"""The sampling flags of ``pagedserve offline``, ``generate`` and ``chat``: declared once, with one set of
defaults (the server's: temperature 1.0, top_p 1.0, n 1, no beams), so a command line means the same
thing whether the engine is local or behind a gateway.

``sampling_kwargs`` gives the flags as keyword arguments that both SamplingParams classes take (the
engine's, gpu_worker.sampling_params, and the Python client's, pagedserve.client): a flag left out is
left out, so each class applies its default (the client's None lets the server decide). Argparse
types refuse what a request cannot carry; every other check is SamplingParams' (InvalidField)."""

from __future__ import annotations

import argparse

from gpu_worker.sampling_params import EarlyStopping


def uint(bits: int, name: str = "an integer"):
    """An argparse type: a non-negative integer that fits ``bits`` bits (what the request can carry)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not 0 <= value < 2**bits:
            raise argparse.ArgumentTypeError(f"must be {name} in [0, 2**{bits}), got {value}")
        return value

    return parse


def _logit_bias(text: str) -> tuple[int, float]:
    """One --logit-bias ID=BIAS (SamplingParams checks the ranges and names the field)."""
    token_id, sep, bias = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return int(token_id), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes ID=BIAS, got {text!r}") from None


def add_sampling_flags(p: argparse.ArgumentParser, *, max_tokens: int | None = None, several: bool = True) -> None:
    """``max_tokens``: the default of --max-tokens (None: the flag is required). ``several``: also the
    flags that return several completions (--n, --beam-width and beam search's own)."""
    if max_tokens is None:
        p.add_argument("--max-tokens", type=uint(32), required=True, help="tokens to generate")
    else:
        p.add_argument("--max-tokens", type=uint(32), default=max_tokens,
                       help=f"largest completion, in tokens (default {max_tokens})")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=uint(32), default=None, help="0 disables (default 0)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus threshold in (0, 1] (default 1.0)")
    p.add_argument("--seed", type=uint(63, "a seed"), default=None, help="per-request seed")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", default=None, help="do not stop at end-of-sequence")
    p.add_argument("--min-tokens", type=uint(32), default=None, help="no stop before this many tokens (default 0)")
    p.add_argument("--presence-penalty", type=float, default=None, help="OpenAI's presence penalty, -2 to 2")
    p.add_argument("--frequency-penalty", type=float, default=None, help="OpenAI's frequency penalty, -2 to 2")
    p.add_argument("--logit-bias", type=_logit_bias, action="append", default=None, metavar="ID=BIAS",
                   help="add BIAS (-100 to 100) to token ID's logit (repeatable)")
    if several:
        p.add_argument("--n", type=uint(32), default=None, help="independent samples of the prompt (default 1)")
        p.add_argument("--beam-width", type=uint(32), default=None,
                       help="beam search with this many beams, as transformers' num_beams (default: off)")
        p.add_argument("--length-penalty", type=float, default=None,
                       help="beam search: score = log probability / length ** length_penalty (default 1)")
        p.add_argument("--early-stopping", choices=("false", "true", "never"), default=None,
                       help="beam search stopping rule, as transformers' early_stopping (default false)")


_FLAGS = ("max_tokens", "temperature", "top_k", "top_p", "seed", "ignore_eos", "min_tokens", "presence_penalty",
          "frequency_penalty", "n", "beam_width", "length_penalty")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """The flags given, as SamplingParams keyword arguments (either class)."""
    kwargs = {name: getattr(args, name) for name in _FLAGS if getattr(args, name, None) is not None}
    if args.stop:
        kwargs["stop"] = tuple(args.stop)
    if args.logit_bias:
        kwargs["logit_bias"] = dict(args.logit_bias)
    if getattr(args, "early_stopping", None) is not None:
        kwargs["early_stopping"] = EarlyStopping.of(args.early_stopping).transformers
    return kwargs
