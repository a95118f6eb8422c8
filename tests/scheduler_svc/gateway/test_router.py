"""The router alone, on stand-in engines: prefix keys are the prefix cache's block hashes, affinity is
stable and the same in every gateway, bounded by load and by free blocks, and the other policies."""

import random
from dataclasses import dataclass

import pytest

from scheduler_svc.block_hash import hash_block, prefix_hashes
from scheduler_svc.gateway.router import Router, rendezvous_score

BLOCK = 16


@dataclass
class FakeEngine:
    name: str
    num_requests: int = 0
    num_free_blocks: int | None = 1000

    @property
    def address(self) -> str:
        return f"addr-{self.name}"


def prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000) for _ in range(length)]


def test_prefix_hashes_are_the_prefix_cache_hashes():
    from scheduler_svc.block_pool import BlockPool
    from scheduler_svc.kv_cache_manager import KVCacheManager
    from scheduler_svc.request import Sequence

    ids = prompt(0, 70)
    cache = KVCacheManager(BlockPool(8, enable_caching=True), BLOCK)
    assert cache.block_hashes(Sequence(0, None, list(ids)), len(ids)) == prefix_hashes(ids, BLOCK, 8)
    want, parent = [], None
    for i in range(4):
        parent = hash_block(parent, ids[i * BLOCK : (i + 1) * BLOCK])
        want.append(parent)
    assert prefix_hashes(ids, BLOCK, 8) == want  # 70 tokens: 4 full blocks
    assert prefix_hashes(ids, BLOCK, 2) == want[:2]
    assert prefix_hashes(ids[:15], BLOCK, 8) == []


def test_a_shared_prefix_lands_on_one_engine_in_every_gateway():
    engines = [FakeEngine(f"engine{i}") for i in range(4)]
    prefix = prompt(1, 4 * BLOCK)
    picks = set()
    for _ in range(3):  # separate routers (gateways) agree without talking
        router = Router("prefix", affinity_blocks=4)
        for i in range(10):
            engine, reason = router.choose(engines, prefix + prompt(100 + i, 5 + i), BLOCK)
            picks.add(engine.name)
            assert reason == "affinity"
    want = max(engines, key=lambda e: rendezvous_score(prefix_hashes(prefix, BLOCK, 4)[-1], e.name))
    assert picks == {want.name}


def test_keys_spread_and_only_the_departed_engines_keys_move():
    engines = [FakeEngine(f"engine{i}") for i in range(4)]
    router = Router("prefix", affinity_blocks=2)
    prompts = [prompt(i, 2 * BLOCK) for i in range(200)]
    before = [router.choose(engines, p, BLOCK)[0].name for p in prompts]
    counts = {e.name: before.count(e.name) for e in engines}
    assert all(25 <= c <= 75 for c in counts.values()), counts
    after = [router.choose(engines[1:], p, BLOCK)[0].name for p in prompts]
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert moved and all(b == "engine0" for b, _ in moved)


def test_load_bound_spills_to_the_next_engine_of_the_ranking():
    engines = [FakeEngine(f"engine{i}") for i in range(3)]
    router = Router("prefix", affinity_blocks=1, slack=2, epsilon=0.0)
    ids = prompt(2, BLOCK + 3)
    key = prefix_hashes(ids, BLOCK, 1)[-1]
    ranked = sorted(engines, key=lambda e: rendezvous_score(key, e.name), reverse=True)
    ranked[0].num_requests = 10
    # limit = (10 + 1) / 3 + 2 = 5.67: the first choice is over it, the second is not.
    assert router.load_limit(engines) == pytest.approx(11 / 3 + 2)
    assert router.choose(engines, ids, BLOCK) == (ranked[1], "spill")
    ranked[1].num_free_blocks = 1  # no room for the prompt's 2 blocks
    assert router.choose(engines, ids, BLOCK) == (ranked[2], "spill")
    ranked[2].num_requests = 9  # every engine over the bound: least loaded
    assert router.choose(engines, ids, BLOCK) == (ranked[1], "least_loaded")


def test_short_prompts_go_to_the_least_loaded_and_ties_take_turns():
    engines = [FakeEngine("a", 3), FakeEngine("b", 1), FakeEngine("c", 1)]
    router = Router("prefix")
    picks = [router.choose(engines, [1, 2, 3], BLOCK) for _ in range(4)]
    assert [(e.name, r) for e, r in picks] == [("b", "least_loaded"), ("c", "least_loaded")] * 2


def test_round_robin_and_least_loaded_ignore_the_prefix():
    engines = [FakeEngine("a", 5), FakeEngine("b", 0)]
    same = prompt(3, 4 * BLOCK)
    rr = Router("round-robin")
    assert [rr.choose(engines, same, BLOCK) for _ in range(4)] == [(engines[0], "round_robin"),
                                                                    (engines[1], "round_robin")] * 2
    least = Router("least-loaded")
    assert [least.choose(engines, same, BLOCK) for _ in range(3)] == [(engines[1], "least_loaded")] * 3


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="routing policy"):
        Router("random")
    with pytest.raises(ValueError):
        Router(affinity_blocks=0)
