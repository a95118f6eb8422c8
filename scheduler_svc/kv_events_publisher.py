"""KV-cache events on the wire: vLLM's msgpack ``KVEventBatch`` on a ZeroMQ PUB socket.

A precise-prefix scorer (llm-d's KV-cache indexer, or vLLM's examples/online_serving/kv_events_subscriber.py)
subscribes and keeps, per pod, which block hashes it holds. The wire form is vLLM's
(vllm/distributed/kv_events.py, msgspec structs with ``array_like=True`` and ``tag=True``):

- one ZeroMQ message per engine step that changed the cache, three frames: the topic
  (``--kv-events-topic``, UTF-8), the batch's sequence number (8 bytes, big-endian, from 0 on start,
  +1 per message: a gap tells the subscriber it missed one), the msgpack payload;
- the payload ``[ts, events, data_parallel_rank]``: wall-clock seconds (float), the events in the order
  they happened, 0 (one engine, no data parallelism);
- each event a tagged array, the tag first: ``["BlockStored", block_hashes, parent_block_hash, token_ids,
  block_size, lora_id, medium, lora_name]``, ``["BlockRemoved", block_hashes, medium]``,
  ``["AllBlocksCleared"]``; ``lora_id`` and ``lora_name`` are nil (no adapters), ``medium`` is ``"GPU"``
  (the device pool; the CPU swap pool is not a cache and sends nothing).

Block hashes are our prefix-cache keys (scheduler_svc.block_hash: blake2b over the parent's hash and the
block's token ids, 128 bits) cut to their low 64 bits, as vLLM sends 64-bit integers. A subscriber that
keys blocks its own way re-hashes from ``token_ids`` and ``parent_block_hash``.

Like vLLM's publisher, the socket binds when the address has a wildcard (``tcp://*:5557``) or is local
(``ipc://``, ``inproc://``), and otherwise connects to a subscriber that binds (llm-d's endpoint picker
binds ``tcp://*:5557`` and every pod connects to it); several engines of one launcher bind consecutive
ports (scheduler_svc.kv_events.engine_endpoint). A PUB socket never blocks: with no subscriber, or
one too slow (past the high-water mark), messages are dropped, and the sequence numbers show it. There
is no replay socket: a subscriber that missed messages waits for the next ``AllBlocksCleared`` (sent on
start) or drops this pod's entries.
"""

from __future__ import annotations

import time

import msgpack
import zmq

from scheduler_svc.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVCacheEvent, binds

MEDIUM = "GPU"
_MASK64 = (1 << 64) - 1


def external_hash(block_hash: int) -> int:
    """A prefix-cache key as it travels: its low 64 bits (msgpack integers have 64)."""
    return block_hash & _MASK64


def event_fields(event: KVCacheEvent) -> list:
    """One event as vLLM's tagged array."""
    if isinstance(event, BlockStored):
        parent = None if event.parent_block_hash is None else external_hash(event.parent_block_hash)
        return ["BlockStored", [external_hash(h) for h in event.block_hashes], parent, event.token_ids,
                event.block_size, None, MEDIUM, None]
    if isinstance(event, BlockRemoved):
        return ["BlockRemoved", [external_hash(h) for h in event.block_hashes], MEDIUM]
    if isinstance(event, AllBlocksCleared):
        return ["AllBlocksCleared"]
    raise TypeError(f"not a KV-cache event: {event!r}")


def encode_batch(events: list[KVCacheEvent], ts: float, data_parallel_rank: int = 0) -> bytes:
    return msgpack.packb([ts, [event_fields(e) for e in events], data_parallel_rank])


class KVEventPublisher:
    """The PUB socket, its topic and its sequence numbers."""

    def __init__(self, endpoint: str, topic: str = "", context: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self._topic = topic.encode()
        self._socket = (context or zmq.Context.instance()).socket(zmq.PUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        try:
            if binds(endpoint):
                self._socket.bind(endpoint)
            else:
                self._socket.connect(endpoint)
        except zmq.ZMQError as exc:
            self._socket.close()
            raise ValueError(f"--kv-events-endpoint {endpoint}: {exc}") from None
        self.seq = 0  # the next message's sequence number
        self.num_dropped = 0  # messages the socket refused (past its high-water mark)

    def publish(self, events: list[KVCacheEvent]) -> None:
        """Sends the events as one batch (nothing when there are none); never blocks."""
        if not events:
            return
        frames = [self._topic, self.seq.to_bytes(8, "big"), encode_batch(events, time.time())]
        self.seq += 1  # a dropped message still takes its number, so subscribers see the gap
        try:
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.num_dropped += 1

    def close(self) -> None:
        self._socket.close()
