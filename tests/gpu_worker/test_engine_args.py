"""EngineArgs: one set of engine settings for every role. Each rule fails with the setting's name, a
child's command line parses back to the same settings for every role, and the per-process configs
take their defaults from it."""

import argparse
from dataclasses import fields

import pytest

from gpu_worker.engine_args import DEFAULTS, ROLES, EngineArgs

# A value other than the default for every setting, each one valid.
CHANGED = dict(
    model="/models/m", device="cuda:1", dtype="bfloat16", block_size=32, kv_cache_memory=3 * 2**20,
    gpu_memory_utilization=0.5, max_num_seqs=7, max_num_batched_tokens=300, max_prefill_tokens_with_decodes=64,
    max_model_len=1000, enable_prefix_caching=False, async_scheduling=False, swap_space=0.25, enforce_eager=True,
    load_format="dummy", max_num_blocks=40, seed=9, tensor_parallel_size=2, max_num_waiting=5, step_timeout=2.5,
    kv_events_endpoint="tcp://*:5599", kv_events_topic="kv@10.0.0.1@m", heartbeat_timeout=4.0,
    kv_cache_dtype="fp8", quantization="fp8", fp8_lm_head=True,
)
REFUSED = {"calculate_kv_scales"}  # flags that exist only to be refused by name: no other valid value


def test_changed_covers_every_setting_with_a_new_value():
    assert set(CHANGED) | REFUSED == {f.name for f in fields(EngineArgs)}
    assert all(getattr(DEFAULTS, k) != v for k, v in CHANGED.items())
    EngineArgs(**CHANGED)  # valid


@pytest.mark.parametrize("name, value", [
    ("device", "tpu"), ("dtype", "int8"), ("block_size", 3), ("block_size", 256), ("kv_cache_memory", 0),
    ("gpu_memory_utilization", 0.0), ("gpu_memory_utilization", 1.5), ("max_num_seqs", 0),
    ("max_num_batched_tokens", 0), ("max_model_len", 0), ("swap_space", -1.0), ("load_format", "gguf"),
    ("max_num_blocks", 0), ("tensor_parallel_size", 0), ("max_num_waiting", -1), ("step_timeout", -1.0),
    ("max_prefill_tokens_with_decodes", -1),
])
def test_a_broken_rule_names_the_setting(name, value):
    with pytest.raises(ValueError, match=rf"^{name} must .*, got {value!r}$"):
        EngineArgs(**{name: value})


def test_sizes_are_bytes_and_paths_strings():
    from pathlib import Path

    args = EngineArgs(model=Path("/m"), kv_cache_memory="64MiB", swap_space=0.5)
    assert (args.model, args.kv_cache_memory, args.swap_space_bytes) == ("/m", 64 * 2**20, 2**29)
    assert DEFAULTS.kv_cache_memory is None  # 256 MiB on CPU, sized from the utilization on CUDA


@pytest.mark.parametrize("role", sorted(ROLES))
def test_to_argv_parses_back_to_the_same_settings(role):
    parser = argparse.ArgumentParser()
    EngineArgs.add_args(parser, role)
    changed = EngineArgs(**{k: v for k, v in CHANGED.items() if k in ROLES[role]})
    defaults = EngineArgs(model="m") if "model" in ROLES[role] else DEFAULTS
    for args in (changed, defaults):
        assert EngineArgs.from_args(parser.parse_args(args.to_argv(role)), role) == args


def test_role_defaults_replace_the_engines_and_unknown_ones_are_refused():
    parser = argparse.ArgumentParser()
    EngineArgs.add_args(parser, "bench-serving", max_num_batched_tokens=8192)
    assert parser.parse_args([]).max_num_batched_tokens == 8192
    assert "(default 8192)" in parser.format_help()
    with pytest.raises(ValueError, match="seed"):
        EngineArgs.add_args(argparse.ArgumentParser(), "bench-serving", seed=1)


def test_process_configs_share_the_defaults_and_rules():
    from gpu_worker.worker import WorkerConfig
    from scheduler_svc.config import SchedulerConfig

    sched = SchedulerConfig()
    assert (sched.block_size, sched.max_num_seqs, sched.max_num_batched_tokens) == (
        DEFAULTS.block_size, DEFAULTS.max_num_seqs, DEFAULTS.max_num_batched_tokens)
    assert SchedulerConfig.from_engine_args(EngineArgs(**CHANGED)) == SchedulerConfig(
        block_size=32, max_num_seqs=7, max_num_batched_tokens=300, max_prefill_tokens_with_decodes=64,
        max_model_len=1000, enable_prefix_caching=False, async_scheduling=False, max_num_waiting=5, step_timeout=2.5,
        kv_events_endpoint="tcp://*:5599", kv_events_topic="kv@10.0.0.1@m", heartbeat_timeout=4.0)
    with pytest.raises(ValueError, match="^block_size must be a power of two"):
        SchedulerConfig(block_size=3)
    worker = WorkerConfig.from_engine_args(EngineArgs(**CHANGED), "ipc://x", rank=1)
    assert (worker.world_size, worker.rank, worker.swap_space, worker.kv_cache_memory) == (2, 1, 2**28, 3 * 2**20)
    assert WorkerConfig(model="m", scheduler_address="x").block_size == DEFAULTS.block_size
    with pytest.raises(ValueError, match="^dtype must be one of"):
        WorkerConfig(model="m", scheduler_address="x", dtype="int8")


def test_kv_cache_memory_auto_leaves_the_pool_to_the_device():
    args = EngineArgs(model="/m", kv_cache_memory="auto")
    assert args.kv_cache_memory is None and "--kv-cache-memory" not in args.to_argv("worker")
    assert EngineArgs(model="/m", kv_cache_memory="2GiB").kv_cache_memory == 2 * 2**30


@pytest.mark.parametrize("value", [-1.0, 0.5, 1.9])
def test_a_heartbeat_timeout_below_four_beats_is_refused(value):
    with pytest.raises(ValueError, match="^heartbeat_timeout must be 0 \\(off\\) or at least 2"):
        EngineArgs(model="/m", heartbeat_timeout=value)
    assert EngineArgs(model="/m", heartbeat_timeout=0).heartbeat_timeout == 0
