"""Constrained decoding on the worker: compiled grammars, one matcher per sequence, and the token mask
applied to the logits before sampling.

Where the state lives: in the worker, next to the sequence's tokens (SeqState). The worker has every
token a sequence has produced before it samples the next one, so the matcher needs nothing from the
scheduler and no mask travels in the StepPlan. A matcher is synced lazily: just before a sampling step
it accepts the sequence's output tokens it has not seen (``SeqGrammar.sync``), so

- a sequence recomputed after preemption (it arrives as a new sequence carrying its generated tokens)
  replays them into a fresh matcher;
- a swapped sequence keeps its SeqState, hence its matcher;
- a fork (n > 1, beams) forks the parent's matcher; a beam whose last token the scheduler replaces
  rolls the matcher back to the common prefix and accepts the new token;
- pipelined steps stay exact: a step with a constrained sequence never launches before the previous
  step's tokens are on the host (ModelRunner.can_follow).

Compilation (tokenizer vocabulary + grammar -> token masks) runs on a thread pool and is cached by the
constraint's source. The pool starts compiling as soon as a sequence arrives in a plan, so it overlaps
the sequence's prefill forward; only a sampling step whose grammar is still compiling waits for it.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from gpu_worker.constraint import Constraint

log = logging.getLogger(__name__)

_CACHE_SIZE = 256  # compiled grammars kept (each holds its token-mask cache: up to a few MB)


class GrammarCache:
    """Compiled grammars of one model's vocabulary, by constraint; compiled on a thread pool."""

    def __init__(self, model: str, vocab_size: int, eos_token_ids: list[int], max_threads: int = 2) -> None:
        self.model = model
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self._pool = ThreadPoolExecutor(max_threads, thread_name_prefix="grammar")
        self._lock = threading.Lock()
        self._compiler = None
        self._futures: dict[Constraint, Future] = {}

    def get(self, constraint: Constraint) -> Future:
        """The compiled grammar's future (shared by every sequence with the same constraint)."""
        with self._lock:
            future = self._futures.pop(constraint, None)
            if future is None:
                future = self._pool.submit(self._compile, constraint)
            self._futures[constraint] = future  # re-inserted: most recently used last
            while len(self._futures) > _CACHE_SIZE:
                del self._futures[next(iter(self._futures))]
            return future

    def _compile(self, constraint: Constraint):
        import xgrammar as xgr

        with self._lock:
            if self._compiler is None:
                info = self._tokenizer_info(xgr)
                self._compiler = xgr.GrammarCompiler(info, max_threads=2)
            compiler = self._compiler
        return compiler.compile_grammar(constraint.to_grammar())

    def _tokenizer_info(self, xgr):
        tokenizer = _load_tokenizer(self.model)
        if tokenizer is None:  # a benchmark shape (config.json only): a synthetic byte-level vocabulary
            return xgr.TokenizerInfo(synthetic_vocab(self.vocab_size), xgr.VocabType.RAW,
                                     stop_token_ids=self.eos_token_ids)
        return xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size,
                                                  stop_token_ids=self.eos_token_ids)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _load_tokenizer(model: str):
    """The transformers tokenizer of the model: its directory's files, or a GGUF checkpoint's metadata."""
    from transformers import AutoTokenizer

    path = Path(model)
    if path.is_dir() and not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")) \
            and not any(path.glob("*.gguf")):
        return None
    if path.is_file() and path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if path.is_dir() and not (path / "tokenizer.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            return AutoTokenizer.from_pretrained(path, gguf_file=ggufs[0].name)
    return AutoTokenizer.from_pretrained(path)


def synthetic_vocab(size: int, seed: int = 0) -> list[str]:
    """A stand-in vocabulary for shapes without a tokenizer: the 256 bytes' characters, then random
    ASCII pieces of 2 to 8 characters (a mask costs about what a real vocabulary's of this size does)."""
    import random

    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _-.,:;\"{}[]"
    vocab = [chr(i) for i in range(min(size, 256))]
    while len(vocab) < size:
        vocab.append("".join(rng.choice(alphabet) for _ in range(rng.randint(2, 8))))
    return vocab


class SeqGrammar:
    """One sequence's matcher. ``accepted`` mirrors the output tokens the matcher has consumed."""

    __slots__ = ("future", "matcher", "accepted", "failed")

    def __init__(self, future: Future) -> None:
        self.future = future
        self.matcher = None
        self.accepted: list[int] = []
        self.failed = False

    def _ensure(self):
        if self.matcher is None:
            import xgrammar as xgr

            # Rollback depth unlimited (-1): beams replace their last token; terminated matchers allow
            # only the stop tokens (the model's EOS ids, given to the TokenizerInfo).
            self.matcher = xgr.GrammarMatcher(self.future.result(), max_rollback_tokens=-1)
        return self.matcher

    def sync(self, outputs: list[int]) -> None:
        """Brings the matcher to ``outputs`` (the sequence's generated tokens so far)."""
        if self.future.exception() is not None:
            return
        matcher = self._ensure()
        accepted = self.accepted
        common = 0
        limit = min(len(accepted), len(outputs))
        while common < limit and accepted[common] == outputs[common]:
            common += 1
        if common < len(accepted):
            matcher.rollback(len(accepted) - common)
            del accepted[common:]
            self.failed = False
        for token in outputs[common:]:
            if self.failed or matcher.is_terminated():
                break
            if not matcher.accept_token(token):
                # Only a token the mask did not allow (e.g. a beam candidate of probability 0): the mask
                # stays that of the last accepted state.
                log.warning("constraint rejected token %d after %d tokens", token, len(accepted))
                self.failed = True
                break
            accepted.append(token)

    def live_matcher(self):
        """The matcher that gives this step's mask; None when only EOS is allowed: a failed compile (entry
        points check constraints, so only a caller bypassing them gets here; that sequence ends at once
        and the step's other sequences are untouched), or a terminated matcher (the sequence sampled EOS
        and the scheduler, planning ahead, ran one more step for it, whose token it drops)."""
        if self.future.exception() is not None or self._ensure().is_terminated():
            return None
        return self.matcher

    def fill(self, bitmask: torch.Tensor, row: int, eos_token_ids: list[int]) -> None:
        """``bitmask[row]``: this sequence's allowed tokens (one row at a time; token_masks batches them)."""
        matcher = self.live_matcher()
        if matcher is None:
            fill_eos(bitmask, row, eos_token_ids)
        else:
            matcher.fill_next_token_bitmask(bitmask, row)

    def fork(self) -> SeqGrammar:
        child = SeqGrammar(self.future)
        if self.matcher is not None:
            child.matcher = self.matcher.fork()
        child.accepted = list(self.accepted)
        child.failed = self.failed
        return child


def fill_eos(bitmask: torch.Tensor, row: int, eos_token_ids: list[int]) -> None:
    bitmask[row] = 0
    for token in eos_token_ids:
        bit = 1 << (token % 32)
        bitmask[row, token // 32] |= bit - (1 << 32) if bit >= 1 << 31 else bit  # int32 sign bit


def fill_threads(num_rows: int) -> int:
    """Threads of one step's batched fill: one per row, up to the cores this process may run on, or up
    to ``PAGEDSERVE_GRAMMAR_THREADS`` when set (1: fill the rows in turn on the calling thread, which
    measured faster on a 2-core host that other work kept busy; BENCHMARKS.md)."""
    cap = os.environ.get("PAGEDSERVE_GRAMMAR_THREADS")
    if cap:
        cores = int(cap)
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(num_rows, cores))


_BATCHERS: dict[int, object] = {}  # xgrammar BatchGrammarMatcher by thread count (each owns a pool)


def token_masks(states: list, vocab_size: int, eos_token_ids: list[int], threads: int | None = None
                ) -> tuple[list[int], torch.Tensor] | None:
    """(rows, bitmask) for the constrained sequences among ``states`` (a sampling step's rows): their
    matchers are synced and ``bitmask[i]`` is row ``i``'s allowed tokens (xgrammar's int32 bit layout;
    [len(states), ceil(vocab/32)], the rows not in ``rows`` unused). None when no row is constrained:
    unconstrained steps pay one attribute check per row.

    The rows with a live matcher are filled together by xgrammar's batched fill, on ``threads`` threads
    (default fill_threads) that run without the GIL; the EOS-only rows are set here. Syncing stays
    serial: it accepts about one token per row and step."""
    rows = [i for i, s in enumerate(states) if s.grammar is not None]
    if not rows:
        return None
    import numpy as np
    import xgrammar as xgr

    # All ones, as xgrammar.allocate_token_bitmask makes it, but filled by numpy: torch.full's parallel
    # region waits for every OpenMP thread, milliseconds on a busy host (measured: 10 ms vs 0.08 ms).
    bitmask = torch.from_numpy(np.full((len(states), (vocab_size + 31) // 32), -1, dtype=np.int32))
    matchers, indices = [], []
    for i in rows:
        state = states[i]
        state.grammar.sync(state.token_ids[state.num_prompt_tokens:])
        matcher = state.grammar.live_matcher()
        if matcher is None:
            fill_eos(bitmask, i, eos_token_ids)
        else:
            matchers.append(matcher)
            indices.append(i)
    threads = threads or fill_threads(len(matchers))
    if len(matchers) == 1 or threads == 1:
        for matcher, i in zip(matchers, indices, strict=True):
            matcher.fill_next_token_bitmask(bitmask, i)
    elif matchers:
        batcher = _BATCHERS.get(threads)
        if batcher is None:
            batcher = _BATCHERS[threads] = xgr.BatchGrammarMatcher(max_threads=threads)
        batcher.batch_fill_next_token_bitmask(matchers, bitmask, indices)
    return rows, bitmask


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def apply_masks(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    """Sets the disallowed tokens of ``rows`` to -inf, in place (returns ``logits``, or a contiguous copy
    when its rows were strided). ``bitmask``: [logits rows, ceil(vocab/32)] int32 on the host, row i for
    logits row i (token_masks). On the host xgrammar's C++ kernel; on CUDA, and for other dtypes, the
    PyTorch reference. (xgrammar's Triton kernel for CUDA is tested against the reference in
    tests/gpu_worker/test_grammar_batch.py but has not run on a GPU yet, and it compiles on first use:
    it replaces the reference on CUDA once a GPU round has passed that test and timed both.)"""
    device = logits.device
    if logits.dtype not in _KERNEL_DTYPES or device.type == "cuda":
        return apply_masks_reference(logits, rows, bitmask)
    import xgrammar as xgr

    if logits.stride(-1) != 1:  # the kernels index rows by stride(0) and tokens contiguously
        logits = logits.contiguous()
    indices = None if len(rows) == logits.shape[0] else rows
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[-1], indices=indices)
    return logits


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def apply_masks_reference(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    """apply_masks in PyTorch ops (a new tensor): unpacks the bits ([rows, vocab/32] int32 -> [rows, vocab]
    bool) and fills -inf. The reference the kernel path is tested against, and the serial baseline of
    ``python -m scheduler_svc.bench.mask_fill``."""
    device = logits.device
    shifts = _SHIFTS.get(device)
    if shifts is None:
        shifts = _SHIFTS[device] = torch.arange(32, dtype=torch.int32, device=device)
    bitmask = bitmask[rows]
    if device.type == "cuda":
        bitmask = bitmask.pin_memory().to(device, non_blocking=True)
    vocab = logits.shape[-1]
    allowed = ((bitmask[:, :, None] >> shifts) & 1).bool().reshape(len(rows), -1)[:, :vocab]
    if len(rows) == logits.shape[0]:
        return logits.masked_fill(~allowed, float("-inf"))
    index = torch.tensor(rows, device=device)
    logits = logits.clone()
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
    return logits
