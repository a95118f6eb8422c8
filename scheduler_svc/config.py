"""Scheduler process configuration: one frozen dataclass, validated on construction.

Derived from the engine's settings (``EngineArgs``), whose defaults and checks it shares, by name: a field
named as a setting is that setting (``from_engine_args``), never copied by hand. Sizes
discovered at start (number of KV blocks, the model's context length) are not here: they arrive in the
workers' hello messages and are passed to the scheduler as plain values.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from gpu_worker.engine_args import DEFAULTS, EngineArgs, check, settings_of


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    block_size: int = DEFAULTS.block_size
    max_num_seqs: int = DEFAULTS.max_num_seqs  # sequences in one step
    max_num_batched_tokens: int = DEFAULTS.max_num_batched_tokens  # tokens in one step (prefill chunks plus decodes)
    # prompt tokens in a step that also decodes; 0: no cap beyond max_num_batched_tokens
    max_prefill_tokens_with_decodes: int = DEFAULTS.max_prefill_tokens_with_decodes
    max_model_len: int | None = DEFAULTS.max_model_len  # cap below the model's own context length
    watermark: float = 0.01  # fraction of blocks kept free when admitting, to avoid instant preemption
    enable_prefix_caching: bool = DEFAULTS.enable_prefix_caching  # reuse cached full blocks of earlier prefixes
    async_scheduling: bool = DEFAULTS.async_scheduling  # plan step N+1 while the workers run step N, where possible
    max_num_waiting: int = DEFAULTS.max_num_waiting  # sequences waiting for admission at most; 0: unbounded
    step_timeout: float = DEFAULTS.step_timeout  # seconds a step may take on the workers; 0: no watchdog
    kv_events_endpoint: str | None = None  # ZeroMQ address of the KV-event PUB socket; None: no events
    kv_events_topic: str = ""
    heartbeat_timeout: float = DEFAULTS.heartbeat_timeout  # seconds without a worker's heartbeat; 0: not watched

    def __post_init__(self) -> None:
        check(self, ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_prefill_tokens_with_decodes",
                     "max_model_len", "max_num_waiting", "step_timeout", "heartbeat_timeout"))
        if not 0 <= self.watermark < 1:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark}")

    @classmethod
    def from_engine_args(cls, engine: EngineArgs) -> SchedulerConfig:
        """Every field named as a setting takes the setting's value, by name: a new scheduler setting is
        its EngineArgs field (flag, default, rule, the scheduler's role) and a field here of the same name.
        The others (watermark) keep their defaults."""
        return cls(**settings_of(cls, engine))


ENGINE_SETTINGS = frozenset(f.name for f in fields(EngineArgs))
