"""Which engine serves a request.

``prefix`` (the default): prefix affinity bounded by load. A prompt's key is the hash of its first full
blocks (at most ``affinity_blocks`` of them), the same chained block hashes the engines' prefix caches
use, so prompts that share those blocks (a system prompt, a few-shot preamble, the start of a
conversation) rank the engines alike: rendezvous hashing, each engine scored by a hash of the key and
its name. Every gateway computes the same ranking without talking to the others, and when an engine
comes or goes only the keys it ranks first move. The request goes to the first engine of its ranking
that is within the load bound and has free KV blocks for the prompt ("affinity" if that is the first,
"spill" otherwise), else to the least loaded engine. A prompt shorter than one block has no key.

The load bound, as in consistent hashing with bounded loads: an engine may hold at most
``(1 + epsilon)`` times the mean number of requests per ready engine, plus ``slack`` requests (the slack
keeps a small burst of one key together: an engine with room to spare admits it at once anyway).
Requests are counted as Engine.num_requests estimates them (the engine's reports plus what was sent since).

``least-loaded``: the fewest requests, ties taken in turn. ``round-robin``: the ready engines in turn,
whatever their load or cache (for comparison).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

from scheduler_svc.block_hash import prefix_hashes

POLICIES = ("prefix", "least-loaded", "round-robin")


class Routable(Protocol):
    name: str
    address: str
    num_requests: int
    num_free_blocks: int | None  # None before the first load report


def rendezvous_score(key: int, name: str) -> int:
    h = hashlib.blake2b(key.to_bytes(16, "little"), digest_size=8)
    h.update(name.encode())
    return int.from_bytes(h.digest(), "little")


class Router:
    def __init__(self, policy: str = "prefix", affinity_blocks: int = 4, slack: int = 8,
                 epsilon: float = 0.25) -> None:
        if policy not in POLICIES:
            raise ValueError(f"routing policy {policy!r}: expected one of {', '.join(POLICIES)}")
        if affinity_blocks < 1 or slack < 0 or epsilon < 0:
            raise ValueError("affinity_blocks must be at least 1, slack and epsilon not negative")
        self.policy = policy
        self.affinity_blocks = affinity_blocks
        self.slack = slack
        self.epsilon = epsilon
        self._turn = 0

    def choose(self, engines: Sequence[Routable], prompt_token_ids: Sequence[int], block_size: int):
        """(engine, reason) for a request; ``engines``: the ready ones, at least one."""
        if self.policy == "round-robin":
            self._turn += 1
            return engines[(self._turn - 1) % len(engines)], "round_robin"
        if self.policy == "prefix":
            hashes = prefix_hashes(list(prompt_token_ids), block_size, self.affinity_blocks)
            if hashes:
                chosen = self._by_affinity(engines, hashes[-1], -(-len(prompt_token_ids) // block_size))
                if chosen is not None:
                    return chosen
        return self.least_loaded(engines), "least_loaded"

    def load_limit(self, engines: Sequence[Routable]) -> float:
        """The most requests an engine may hold, this one included, and still take affinity requests."""
        total = sum(e.num_requests for e in engines) + 1
        return (1 + self.epsilon) * total / len(engines) + self.slack

    def _by_affinity(self, engines: Sequence[Routable], key: int, num_prompt_blocks: int):
        limit = self.load_limit(engines)
        ranked = sorted(engines, key=lambda e: (rendezvous_score(key, e.name), e.address), reverse=True)
        for rank, engine in enumerate(ranked):
            free = engine.num_free_blocks
            if engine.num_requests + 1 <= limit and (free is None or free >= num_prompt_blocks):
                return engine, "affinity" if rank == 0 else "spill"
        return None

    def least_loaded(self, engines: Sequence[Routable]):
        fewest = min(e.num_requests for e in engines)
        candidates = [e for e in engines if e.num_requests == fewest]
        self._turn += 1
        return candidates[(self._turn - 1) % len(candidates)]
