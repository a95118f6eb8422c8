"""Token sampling on the worker's device: greedy, temperature, top-k, top-p, min-p, the logit
adjustments (logit bias, min_tokens, repetition, frequency and presence penalties), and per-request
seeds.

The adjustments follow vLLM's order: logit bias and min_tokens first, then the repetition penalty
(transformers': over prompt and output), then the frequency and presence penalties (OpenAI's: over the
output only). Log probabilities are always those of the raw logits, before any of them.

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
    eos_token_ids: tuple[int, ...] = (),
) -> SampleResult:
    """Chooses one token per row on the logits' device; the host reads back only the results.
    ``eos_token_ids``: the model's, which min_tokens holds back (unless the row ignores EOS)."""
    logits = logits.float()
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs or num_top_logprobs else None
    logits = adjust_logits(logits, rows, eos_token_ids)
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


def adjust_logits(logits: torch.Tensor, rows: list[SampleRequest], eos_token_ids: tuple[int, ...] = ()
                  ) -> torch.Tensor:
    """The logits the choice is made from: a copy, with every row's adjustments applied (see the module
    docstring for the order); ``logits`` itself when no row has any."""
    penalized = [i for i, r in enumerate(rows) if r.params.penalized]
    if not penalized:
        return logits
    logits = logits.clone()
    vocab = logits.shape[-1]
    device = logits.device
    for i in penalized:
        row, p = rows[i], rows[i].params
        if p.logit_bias:
            ids = torch.tensor([t for t, _ in p.logit_bias if t < vocab], device=device, dtype=torch.long)
            bias = torch.tensor([b for t, b in p.logit_bias if t < vocab], device=device, dtype=logits.dtype)
            logits[i, ids] += bias
        if p.min_tokens and row.output_index < p.min_tokens:
            # As vLLM: nothing that would end the sequence may be chosen before min_tokens outputs.
            banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
            banned_ids = [t for t in banned if t < vocab]
            if banned_ids:
                logits[i, torch.tensor(banned_ids, device=device, dtype=torch.long)] = -float("inf")
        if p.repetition_penalty != 1.0:  # transformers': positive logits divided, negative multiplied
            seen = torch.tensor(sorted(set(row.token_ids)), device=device, dtype=torch.long)
            vals = logits[i, seen]
            logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and row.output_index:
            # OpenAI: logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty.
            outputs = row.token_ids[len(row.token_ids) - row.output_index:]
            counts = torch.bincount(torch.tensor(outputs, device=device, dtype=torch.long), minlength=vocab)[:vocab]
            counts = counts.to(logits.dtype)
            logits[i] -= counts * p.frequency_penalty + (counts > 0).to(logits.dtype) * p.presence_penalty
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
