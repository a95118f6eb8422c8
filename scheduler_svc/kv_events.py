"""KV-cache events: what the prefix cache stored and evicted, for a scheduler outside the engine.

The block pool records an event where the prefix cache changes (``BlockPool(..., events=KVEventLog())``):
a run of full blocks indexed under their hashes (``BlockStored``), cached blocks taken for new data
(``BlockRemoved``), the whole cache gone (``AllBlocksCleared``, once when the pool starts, so that a
subscriber forgets what an earlier process on this address held). The engine drains the log after
each step and publishes the batch (scheduler_svc.kv_events_publisher: vLLM's msgpack ``KVEventBatch``
on a ZeroMQ PUB socket). Without a log the pool records nothing and pays nothing.

The records are plain; the wire form (64-bit hashes, the medium, vLLM's field order) is the
publisher's. The addressing rules (bind or connect; one address per engine) are here, standard library
only, for the launcher.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class BlockStored:
    """Full blocks newly cached, in table order: block i holds ``token_ids[i*block_size:(i+1)*block_size]``."""

    block_hashes: list[int]
    parent_block_hash: int | None  # the hash of the block before the first one (None: the prompt's start)
    token_ids: list[int]
    block_size: int


@dataclass(slots=True)
class BlockRemoved:
    """Cached blocks evicted (taken for new data): their hashes no longer find them."""

    block_hashes: list[int]


@dataclass(slots=True)
class AllBlocksCleared:
    """Nothing is cached any more."""


KVCacheEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(slots=True)
class KVEventLog:
    """The events recorded since the last ``drain``, in the order they happened."""

    block_size: int
    events: list[KVCacheEvent] = field(default_factory=list)

    def stored(self, block_hashes: list[int], parent_block_hash: int | None, token_ids: list[int]) -> None:
        self.events.append(BlockStored(block_hashes, parent_block_hash, token_ids, self.block_size))

    def removed(self, block_hashes: list[int]) -> None:
        self.events.append(BlockRemoved(block_hashes))

    def cleared(self) -> None:
        self.events.append(AllBlocksCleared())

    def drain(self) -> list[KVCacheEvent]:
        events, self.events = self.events, []
        return events


def binds(endpoint: str) -> bool:
    """Whether the PUB socket binds ``endpoint`` (vLLM's rule: a wildcard or a local transport) rather
    than connecting to a subscriber that binds it."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def engine_endpoint(endpoint: str, index: int) -> str:
    """Engine ``index``'s address when one launcher runs several: engines connecting to a subscriber share
    its address; bound ones cannot, so engine i binds tcp port + i (or ``_<i>`` after a local address), as
    vLLM offsets a data-parallel rank's."""
    if not index or not binds(endpoint):
        return endpoint
    if endpoint.startswith("tcp://"):
        base, _, port = endpoint.rpartition(":")
        if not port.isdigit():
            raise ValueError(f"--kv-events-endpoint {endpoint}: several engines need a numeric port to offset")
        return f"{base}:{int(port) + index}"
    return f"{endpoint}_{index}"
