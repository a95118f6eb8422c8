"""KV-cache events: the block pool records what the prefix cache stores and evicts, and the engine
publishes it as vLLM's msgpack KVEventBatch on a ZeroMQ PUB socket. A subscriber that replays the events
ends up with exactly the scheduler's prefix cache: the same keys, each proven by re-hashing the token ids
the event carries onto its parent's hash."""

import time

import pytest

msgpack = pytest.importorskip("msgpack")
zmq = pytest.importorskip("zmq")

from scheduler_svc.block_hash import hash_block  # noqa: E402
from scheduler_svc.block_pool import BlockPool  # noqa: E402
from scheduler_svc.kv_events import (  # noqa: E402
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventLog,
    binds,
    engine_endpoint,
)
from scheduler_svc.kv_events_publisher import encode_batch, external_hash  # noqa: E402
from tests.scheduler_svc.test_engine import FakeWorkers, finished, make_engine, run_until, submit  # noqa: E402
from tests.waiting import wait_until  # noqa: E402

BLOCK_SIZE = 4
TOPIC = "kv@10.0.0.7@smollm2"


def test_the_pool_records_runs_of_stored_blocks_and_evictions():
    log = KVEventLog(block_size=2)
    pool = BlockPool(3, enable_caching=True, events=log)
    assert log.drain() == [AllBlocksCleared()]  # a fresh pool
    b0, b1, b2 = pool.allocate(3)
    pool.cache_blocks([b0], [10], None, [1, 2])
    pool.cache_blocks([b1], [10], None, [1, 2])  # 10 is b0's: nothing new, no event
    pool.cache_blocks([b2], [12], 11, [5, 6])
    assert log.drain() == [BlockStored([10], None, [1, 2], 2), BlockStored([12], 11, [5, 6], 2)]
    pool.release([b2, b1, b0])
    pool.allocate(2)  # b2 (cached 12), then b1 (uncached)
    assert log.drain() == [BlockRemoved([12])]


def test_a_run_broken_by_an_already_cached_block_is_two_events_with_their_parents():
    log = KVEventLog(block_size=1)
    pool = BlockPool(4, enable_caching=True, events=log)
    log.drain()
    a, b, c, d = pool.allocate(4)
    pool.cache_blocks([b], [21])
    log.drain()
    pool.cache_blocks([a, c, d], [20, 21, 22], 7, [1, 2, 3])  # c's hash is b's already
    assert log.drain() == [BlockStored([20], 7, [1], 1), BlockStored([22], 21, [3], 1)]


def test_the_wire_shape_is_vllms_tagged_arrays():
    events = [AllBlocksCleared(), BlockStored([2**100 + 5], None, [1, 2], 2), BlockStored([6], 2**70 + 1, [3, 4], 2),
              BlockRemoved([2**64 + 9])]
    ts, wire, rank = msgpack.unpackb(encode_batch(events, 12.5))
    assert (ts, rank) == (12.5, 0)
    assert wire == [["AllBlocksCleared"], ["BlockStored", [5], None, [1, 2], 2, None, "GPU", None],
                    ["BlockStored", [6], 1, [3, 4], 2, None, "GPU", None], ["BlockRemoved", [9], "GPU"]]
    assert binds("tcp://*:5557") and binds("ipc:///tmp/kv") and not binds("tcp://epp.svc:5557")


def test_engines_of_one_launcher_bind_their_own_addresses_and_share_a_subscribers():
    assert [engine_endpoint("tcp://*:5557", i) for i in range(3)] == ["tcp://*:5557", "tcp://*:5558", "tcp://*:5559"]
    assert engine_endpoint("ipc:///tmp/kv", 2) == "ipc:///tmp/kv_2"
    assert engine_endpoint("tcp://epp:5557", 2) == "tcp://epp:5557"
    with pytest.raises(ValueError, match="numeric port"):
        engine_endpoint("tcp://*:*", 1)


class Subscriber:
    """A precise-prefix scorer in miniature: keeps the pod's cache from the events alone."""

    def __init__(self, socket):
        self.socket = socket
        self.seqs: list[int] = []
        self.full: dict[int, int] = {}  # external hash -> our full hash, recomputed from the token ids
        self.num_removed = 0
        self.num_stored = 0

    def receive(self, timeout_ms: int = 0) -> bool:
        if not self.socket.poll(timeout_ms):
            return False
        topic, seq, payload = self.socket.recv_multipart()
        assert topic.decode() == TOPIC
        self.seqs.append(int.from_bytes(seq, "big"))
        ts, events, rank = msgpack.unpackb(payload)
        assert abs(ts - time.time()) < 60 and rank == 0
        for event in events:
            self.apply(event)
        return True

    def apply(self, event: list) -> None:
        tag = event[0]
        if tag == "AllBlocksCleared":
            self.full.clear()
        elif tag == "BlockStored":
            _, hashes, parent, token_ids, block_size, lora_id, medium, lora_name = event
            assert (block_size, lora_id, medium, lora_name) == (BLOCK_SIZE, None, "GPU", None)
            assert len(token_ids) == len(hashes) * block_size
            parent_full = None if parent is None else self.full[parent]  # the parent is known and cached
            for i, ext in enumerate(hashes):
                full = hash_block(parent_full, token_ids[i * block_size : (i + 1) * block_size])
                assert external_hash(full) == ext, "the event's tokens do not hash to its block hash"
                assert ext not in self.full
                self.full[ext] = parent_full = full
            self.num_stored += len(hashes)
        else:
            _, hashes, medium = event
            assert tag == "BlockRemoved" and medium == "GPU"
            for ext in hashes:
                del self.full[ext]
            self.num_removed += len(hashes)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_a_subscriber_replays_the_prefix_cache_evictions_included(tmp_path, async_scheduling):
    endpoint = f"ipc://{tmp_path}/kv-events"
    # 10 blocks of 4 tokens; each request takes 4, so later ones evict the cached blocks of earlier ones.
    workers = FakeWorkers(num_blocks=(10,), block_size=BLOCK_SIZE, max_model_len=40)
    engine, _ = make_engine(workers, kv_events_endpoint=endpoint, kv_events_topic=TOPIC, max_num_batched_tokens=16,
                            async_scheduling=async_scheduling)
    ctx = zmq.Context.instance()
    socket = ctx.socket(zmq.SUB)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt_string(zmq.SUBSCRIBE, TOPIC)
    socket.connect(endpoint)
    sub = Subscriber(socket)
    # PUB drops what it sends before the subscription has arrived: knock until one gets through.
    wait_until(lambda: engine.kv_events.publish([AllBlocksCleared()]) or sub.receive(50), 10,
               what="the subscription to reach the publisher")
    while sub.receive(50):
        pass
    sub.seqs.clear()
    outputs = []
    stream = engine.open_stream(outputs.append)
    shared = list(range(1, 9))  # two full blocks that the odd prompts share
    # 13-token prompts and 4 tokens each: 3 full blocks computed; 18 distinct blocks cached over time (the
    # hashes chain, so a prompt's own first token makes each of its blocks its own).
    prompts = {f"r{i}": (shared + [30 + i] if i % 2 else [10 + i]) + list(range(40, 52 - 8 * (i % 2)))
               for i in range(8)}
    for request_id, prompt in prompts.items():
        engine.submit(stream, submit(request_id, prompt, 4))
    assert run_until(engine, lambda: finished(outputs, set(prompts))) is None
    assert not [o.error for e in outputs for o in e.outputs if o.error]
    while sub.receive(200):
        pass
    pool = engine.scheduler.pool
    assert set(sub.full) == {external_hash(h) for h in pool.cached_blocks}
    assert pool.num_evictions > 0 and sub.num_removed == pool.num_evictions
    assert sub.num_stored == len(pool.cached_blocks) + pool.num_evictions
    assert sub.seqs == list(range(sub.seqs[0], sub.seqs[0] + len(sub.seqs)))  # nothing lost, in order
    socket.close()


def test_a_bind_address_in_use_is_refused_by_flag_name():
    from scheduler_svc.kv_events_publisher import KVEventPublisher

    taken = zmq.Context.instance().socket(zmq.PUB)
    taken.setsockopt(zmq.LINGER, 0)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    try:
        with pytest.raises(ValueError, match=rf"^--kv-events-endpoint tcp://\*:{port}: "):
            KVEventPublisher(f"tcp://*:{port}")
    finally:
        taken.close()
