"""Token sampling on the worker's device: greedy, temperature, top-k, top-p, min-p, repetition
penalty, and per-request seeds.

A seeded sequence draws its token at output position i from a generator seeded with (seed, i), so its
output does not depend on batch composition or preemption.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpu_worker.sampling_params import SamplingParams

_SEED_STRIDE = 1_000_003


@dataclass(slots=True)
class SampleRequest:
    """One row of the logits to sample from: its sequence's parameters (defaults already resolved by
    SamplingParams.from_proto) and where the sequence stands."""

    params: SamplingParams
    output_index: int  # index of the token being sampled among the sequence's outputs
    token_ids: list[int]  # tokens so far, for the repetition penalty


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[float]  # log-softmax of the raw logits at the chosen tokens
    top_token_ids: list[list[int]]
    top_logprobs: list[list[float]]


def sample(
    logits: torch.Tensor,  # [num_rows, vocab]
    rows: list[SampleRequest],
    num_top_logprobs: int = 0,
    generator: torch.Generator | None = None,
    want_logprobs: bool = True,
) -> SampleResult:
    """Chooses one token per row on the logits' device; the host reads back only the results."""
    logits = logits.float()
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs or num_top_logprobs else None
    logits = _apply_repetition_penalty(logits, rows)
    chosen = torch.argmax(logits, dim=-1)
    random_rows = [i for i, r in enumerate(rows) if r.params.temperature > 0]
    if random_rows:
        idx = torch.tensor(random_rows, device=logits.device)
        probs = _filtered_probs(logits[idx], [rows[i].params for i in random_rows])
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p; seeded rows get their own noise.
        noise = torch.empty_like(probs).exponential_(generator=generator)
        for j, i in enumerate(random_rows):
            row = rows[i]
            seed = row.params.seed
            if seed is not None:
                gen = torch.Generator(device=logits.device)
                gen.manual_seed((seed * _SEED_STRIDE + row.output_index) % (2**63))
                noise[j].exponential_(generator=gen)
        chosen[idx] = torch.argmax(probs / noise, dim=-1)
    token_ids = chosen.tolist()
    if raw_logprobs is None:
        return SampleResult(token_ids, [], [], [])
    token_lp = raw_logprobs.gather(1, chosen[:, None])[:, 0].tolist()
    top_ids: list[list[int]] = []
    top_lps: list[list[float]] = []
    if num_top_logprobs:
        values, indices = raw_logprobs.topk(num_top_logprobs, dim=-1)
        top_ids, top_lps = indices.tolist(), values.tolist()
    return SampleResult(token_ids, token_lp, top_ids, top_lps)


def _apply_repetition_penalty(logits: torch.Tensor, rows: list[SampleRequest]) -> torch.Tensor:
    """As in transformers: seen tokens' positive logits are divided by the penalty, negative multiplied."""
    penalized = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if not penalized:
        return logits
    logits = logits.clone()
    for i in penalized:
        seen = torch.tensor(sorted(set(rows[i].token_ids)), device=logits.device, dtype=torch.long)
        vals = logits[i, seen]
        p = rows[i].params.repetition_penalty
        logits[i, seen] = torch.where(vals > 0, vals / p, vals * p)
    return logits


def _scaled(logits: torch.Tensor, temps: torch.Tensor) -> torch.Tensor:
    """``logits / temps``, whose softmax is the distribution; rows where that overflows take the limit.

    A temperature near the float minimum (1e-38) sends finite logits to +-inf, and a repetition
    penalty near it (1e-38) sends a seen token's positive logit to +inf; softmax of a row holding +inf
    is nan everywhere, and the exponential race would then pick token 0. Such a row is rescaled by
    its maximum first, ``(logits - max) / temperature``, which has the same softmax and tops out at
    0: the top token(s) keep all the mass, as greedy decoding would pick them. A row whose maximum is
    itself +inf shares its mass among its +inf entries. Rows that do not overflow (every ordinary
    temperature and penalty) are computed exactly as before: the division alone, as transformers'."""
    scaled = logits / temps
    top = logits.amax(dim=-1, keepdim=True)
    top_inf = torch.isposinf(top)
    overflow = (torch.isinf(scaled) & torch.isfinite(logits)).any(dim=-1, keepdim=True) | top_inf
    if not overflow.any():  # one device sync: the sampler reads its tokens back right after anyway
        return scaled
    limit = torch.where(top_inf, torch.where(torch.isposinf(logits), 0.0, -torch.inf), (logits - top) / temps)
    return torch.where(overflow, limit, scaled)


def _filtered_probs(logits: torch.Tensor, rows: list[SamplingParams]) -> torch.Tensor:
    """Softmax after temperature, then top-k, top-p and min-p filtering (renormalized)."""
    device = logits.device
    temps = torch.tensor([r.temperature for r in rows], device=device)[:, None]
    probs = torch.softmax(_scaled(logits, temps), dim=-1)
    vocab = probs.shape[-1]
    top_k = torch.tensor([r.top_k if 0 < r.top_k < vocab else vocab for r in rows], device=device)
    top_p = torch.tensor([r.top_p for r in rows], device=device)
    min_p = torch.tensor([r.min_p for r in rows], device=device)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)[None, :]
    # A token survives top-p if the mass strictly before it is below top_p (the top token always does).
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep = (ranks < top_k[:, None]) & (mass_before < top_p[:, None])
    keep &= sorted_probs >= min_p[:, None] * sorted_probs[:, :1]
    sorted_probs = sorted_probs * keep
    probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
    return probs / probs.sum(dim=-1, keepdim=True)
