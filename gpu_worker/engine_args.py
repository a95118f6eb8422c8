"""Engine settings, defined once for every process that takes them.

``EngineArgs`` holds every setting of the engine (scheduler and workers together); each field carries
its command-line flag and help text. A process role adds the flags it uses (``add_args``), reads them
back (``from_args``), and a launcher writes a child's command line from the same settings
(``to_argv``), so a default or a help text exists in one place. The per-process configs
(``SchedulerConfig``, ``WorkerConfig``) are derived from it and share its defaults and checks
(``DEFAULTS``, ``check``).

It lives at the bottom of the house (stdlib only) because every role imports it: the worker must not
import the scheduler side.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterable
from dataclasses import Field, dataclass, field, fields
from typing import Any

BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
DTYPES = ("auto", "float32", "bfloat16", "float16")
LOAD_FORMATS = ("auto", "dummy")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # fp8 is e4m3 (gpu_worker/fp8.py)
QUANTIZATIONS = ("none", "fp8")


def parse_bytes(text: str) -> int:
    """'512MiB', '2GiB', '1e9' or a plain integer, as bytes."""
    m = re.fullmatch(r"\s*([0-9.e+]+)\s*([KMGT]i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 512MiB, 2GiB, 1000000)")
    scale = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    unit = (m.group(2) or "").lower()
    return int(float(m.group(1)) * (scale[unit[0]] if unit else 1))


def parse_kv_size(text: str) -> int | None:
    """A KV pool size, or 'auto' (None): sized by the device (see EngineArgs.kv_cache_memory)."""
    return None if text.strip().lower() == "auto" else parse_bytes(text)


def _option(default: Any, *flags: str, help: str, type: Callable | None = None, **extra: Any) -> Any:
    """A field with its flags; ``type=None`` makes a switch whose flag turns the default around."""
    return field(default=default, metadata={"flags": flags, "help": help, "type": type, **extra})


# A check per setting, as (holds, what it must be); the process configs run the same ones.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "device": (lambda v: re.fullmatch(r"cpu|cuda(:[0-9]+)?", v) is not None, "must be cpu, cuda or cuda:N"),
    "dtype": (lambda v: v in DTYPES, f"must be one of {', '.join(DTYPES)}"),
    "block_size": (lambda v: v in BLOCK_SIZES, "must be a power of two up to 128"),
    "kv_cache_memory": (lambda v: v is None or v > 0, "must be positive"),
    "gpu_memory_utilization": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "max_num_seqs": (lambda v: v >= 1, "must be at least 1"),
    "max_num_batched_tokens": (lambda v: v >= 1, "must be at least 1"),
    "max_prefill_tokens_with_decodes": (lambda v: v >= 0, "must be >= 0 (0: no cap)"),
    "max_model_len": (lambda v: v is None or v >= 1, "must be at least 1"),
    "swap_space": (lambda v: v >= 0, "must be >= 0"),
    "load_format": (lambda v: v in LOAD_FORMATS, f"must be one of {', '.join(LOAD_FORMATS)}"),
    "max_num_blocks": (lambda v: v is None or v >= 1, "must be at least 1"),
    "kv_cache_dtype": (lambda v: v in KV_CACHE_DTYPES, f"must be one of {', '.join(KV_CACHE_DTYPES)}"),
    "quantization": (lambda v: v in QUANTIZATIONS, f"must be one of {', '.join(QUANTIZATIONS)}"),
    "calculate_kv_scales": (lambda v: not v, "is not supported: fp8 KV scales come from the checkpoint's "
                            "k_scale/v_scale tensors, else 1.0"),
    "tensor_parallel_size": (lambda v: v >= 1, "must be at least 1"),
    "max_num_waiting": (lambda v: v >= 0, "must be >= 0 (0: unbounded)"),
    "step_timeout": (lambda v: v >= 0, "must be >= 0 (0: no watchdog)"),
    "heartbeat_timeout": (lambda v: v == 0 or v >= 2, "must be 0 (off) or at least 2 (the workers beat every 0.5 s)"),
}


def check(config: object, names: Iterable[str]) -> None:
    """Raises ValueError naming the first of ``names`` whose value on ``config`` breaks its rule."""
    for name in names:
        holds, rule = _RULES[name]
        value = getattr(config, name)
        if not holds(value):
            raise ValueError(f"{name} {rule}, got {value!r}")


def check_device_present(device: str, gpus: int = 1) -> None:
    """Raises ValueError, in one line, when ``device`` names CUDA GPUs this machine does not have: a bare
    ``cuda`` needs ``gpus`` of them (the launchers number ranks and engines from cuda:0), ``cuda:N`` needs
    GPU N (every rank shares it). A launcher checks before it starts any process, so that a
    CPU-only host answers ``--device cuda`` with a sentence instead of a worker's traceback. torch is
    imported only for a CUDA device (a CPU launcher stays light)."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        why = "this PyTorch is a CPU-only build" if torch.version.cuda is None else "PyTorch sees no CUDA GPU"
        raise ValueError(f"--device {device}: {why} (torch {torch.__version__}); use --device cpu, or run on a "
                         "GPU host with a CUDA build of torch")
    index = device.partition(":")[2]
    needed = int(index) + 1 if index else gpus
    if needed > torch.cuda.device_count():
        raise ValueError(f"--device {device}: needs {needed} GPU(s) (cuda:0 .. cuda:{needed - 1}), but PyTorch "
                         f"sees {torch.cuda.device_count()}")


CPU_KV_CACHE_MEMORY = 256 * 2**20  # KV pool of a CPU worker when --kv-cache-memory is not given


@dataclass(frozen=True)
class EngineArgs:
    model: str = _option("", "--model", type=str, help="Hugging Face checkpoint directory")
    device: str = _option("cpu", "--device", type=str, help="cpu, cuda or cuda:N (default %(default)s)")
    dtype: str = _option("auto", "--dtype", type=str,
                         help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16 or float16 "
                         "(default %(default)s)")
    block_size: int = _option(16, "--block-size", type=int, help="tokens per KV block (default %(default)s)")
    # Bytes; also given as a size ('256MiB'), which __post_init__ turns into bytes. None: CPU_KV_CACHE_MEMORY
    # on CPU; on CUDA whatever gpu_memory_utilization leaves. A size given on CUDA wins over the utilization
    # (as vLLM's kv_cache_memory_bytes does): several engines can then share one GPU without racing to size.
    kv_cache_memory: int | None = _option(
        None, "--kv-cache-memory", type=parse_kv_size,
        help="KV pool size per worker, e.g. 64MiB, or auto (default auto: 256MiB on CPU; on CUDA, what "
        "--gpu-memory-utilization leaves after the weights and the largest step; a size given here "
        "replaces that sizing on CUDA too)")
    gpu_memory_utilization: float = _option(
        0.9, "--gpu-memory-utilization", type=float,
        help="fraction of GPU memory for weights, activations and the KV pool (default %(default)s)")
    max_num_seqs: int = _option(256, "--max-num-seqs", type=int,
                                help="sequences per step; CUDA graphs are captured up to it (default %(default)s)")
    max_num_batched_tokens: int = _option(
        2048, "--max-num-batched-tokens", type=int,
        help="tokens per step, prefill chunks included; the workers size their memory by a step this large "
        "(default %(default)s)")
    max_prefill_tokens_with_decodes: int = _option(
        0, "--max-prefill-tokens-with-decodes", type=int, metavar="N",
        help="while sequences decode, a step computes at most this many prompt tokens (prefill chunks and "
        "admissions together), so that a burst of arrivals lengthens the decodes' steps, and so their "
        "inter-token latency, less; steps with no decode still take --max-num-batched-tokens "
        "(default 0: no cap)")
    max_model_len: int | None = _option(None, "--max-model-len", type=int,
                                        help="context length served (prompt plus completion); the KV pool must "
                                        "hold one sequence of it or the engine refuses to start (default: the model's, "
                                        "lowered to what the KV pool holds, with a log line)")
    enable_prefix_caching: bool = _option(
        True, "--no-prefix-caching",
        help="do not reuse the KV blocks of earlier requests' identical prompt prefixes (automatic prefix "
        "caching is on by default)")
    async_scheduling: bool = _option(
        True, "--no-async-scheduling",
        help="plan each step only after the previous step's results (by default the next decode step is "
        "planned and sent while the workers still run the current one)")
    swap_space: float = _option(  # GiB per worker
        4.0, "--swap-space", type=float,
        help="GiB of CPU memory per worker for swapped-out KV blocks of preempted sequence groups (n > 1, "
        "beam search); 0 disables swapping (default %(default)s)")
    enforce_eager: bool = _option(False, "--enforce-eager", help="do not capture CUDA graphs")
    load_format: str = _option(
        "auto", "--load-format", type=str, choices=LOAD_FORMATS,
        help="dummy: random weights of the checkpoint's shapes, from config.json alone, for benchmarks "
        "(default %(default)s)")
    max_num_blocks: int | None = _option(
        None, "--max-num-blocks", type=int,
        help="allocate at most this many KV blocks even if more fit (default: all that fit)")
    kv_cache_dtype: str = _option(
        "auto", "--kv-cache-dtype", type=str, choices=KV_CACHE_DTYPES,
        help="auto: the model's dtype; fp8 (= fp8_e4m3): an e4m3 KV cache with per-layer K and V scales "
        "(the checkpoint's k_scale/v_scale, else 1.0), half the bytes per token (default %(default)s)")
    quantization: str = _option(
        "none", "--quantization", type=str, choices=QUANTIZATIONS,
        help="fp8: quantize the linear layers' weights to e4m3 at load (per-output-channel scales; "
        "activations per token at run time). A checkpoint whose config.json names compressed-tensors FP8 "
        "loads as fp8 without it (default %(default)s)")
    fp8_lm_head: bool = _option(False, "--fp8-lm-head",
                                help="with fp8 weights, quantize the LM head too (default: serving dtype)")
    calculate_kv_scales: bool = _option(
        False, "--calculate-kv-scales",
        help="not supported (refused): fp8 KV scales come from the checkpoint or default to 1.0")
    seed: int = _option(0, "--seed", type=int, help="seed of unseeded sampling (default %(default)s)")
    tensor_parallel_size: int = _option(
        1, "--tensor-parallel-size", "--world-size", type=int, metavar="N",
        help="tensor-parallel ranks, one worker process per GPU (default %(default)s)")

    max_num_waiting: int = _option(
        1024, "--max-num-waiting", type=int, metavar="N",
        help="sequences that may wait for admission (those the engine cannot admit now, for want of free "
        "sequence seats or KV blocks); a request beyond it is refused at once with "
        "RESOURCE_EXHAUSTED and a retry hint; 0: unbounded (default %(default)s)")
    step_timeout: float = _option(
        120.0, "--step-timeout", type=float, metavar="SECONDS",
        help="a worker that does not answer a step within this many seconds fails the engine like a dead "
        "one (every stream ends UNAVAILABLE, the scheduler exits non-zero); the first steps after start get "
        "at least 900 s, for kernel compilation; 0 disables the watchdog (default %(default)s)")
    heartbeat_timeout: float = _option(
        10.0, "--heartbeat-timeout", type=float, metavar="SECONDS",
        help="a worker process whose liveness heartbeat (sent every 0.5 s by a thread of its own, however "
        "long its step) stops for this many seconds, once serving, is stalled (SIGSTOPped, frozen) and fails "
        "the engine like a dead one; at least 2, 0 disables (default %(default)s)")

    kv_events_endpoint: str | None = _option(
        None, "--kv-events-endpoint", type=str, metavar="ZMQ_ADDRESS",
        help="publish KV-cache events (blocks stored, removed, all cleared; vLLM's msgpack KVEventBatch) on "
        "a ZeroMQ PUB socket: bound when the address has a wildcard (tcp://*:5557) or is ipc:// or "
        "inproc://, else connected to a subscriber that binds, as llm-d's endpoint picker does (default: off)")
    kv_events_topic: str = _option(
        "", "--kv-events-topic", type=str, metavar="TOPIC",
        help="the ZeroMQ topic of every KV-event message, e.g. kv@POD_IP@MODEL for llm-d (default: empty)")

    def __post_init__(self) -> None:
        if isinstance(self.kv_cache_memory, str):
            object.__setattr__(self, "kv_cache_memory", parse_kv_size(self.kv_cache_memory))
        object.__setattr__(self, "model", str(self.model))
        check(self, _RULES)

    @property
    def swap_space_bytes(self) -> int:
        return int(self.swap_space * 2**30)

    # ---- command lines

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser | argparse._ArgumentGroup, role: str, **defaults: Any) -> None:
        """Adds the flags of ``role`` (a key of ROLES) to a parser or an argument group; ``defaults``
        replace the engine's for this parser (a benchmark's larger step, say), and the help texts show them."""
        unknown = set(defaults) - set(ROLES[role])
        if unknown:
            raise ValueError(f"{role} takes no {', '.join(sorted(unknown))}")
        for f in _fields(role):
            meta = f.metadata
            kw: dict[str, Any] = {"dest": f.name, "help": meta["help"]}
            if f.name in defaults and "%(default)s" not in meta["help"]:  # the engine's default is not this one
                kw["help"] += "; here %(default)s"
            if meta["type"] is None:
                kw["action"] = "store_false" if f.default else "store_true"
            else:
                kw.update(type=meta["type"], default=defaults.get(f.name, f.default))
                kw.update({k: meta[k] for k in ("choices", "metavar") if k in meta})
                if f.name == "model":
                    kw["required"] = True
            parser.add_argument(*meta["flags"], **kw)

    @classmethod
    def from_args(cls, ns: argparse.Namespace, role: str, **overrides: Any) -> EngineArgs:
        """The settings that ``role``'s flags parsed into ``ns``, with ``overrides``; the others keep
        their defaults. Raises ValueError for a value that breaks a rule."""
        values = {name: getattr(ns, name) for name in ROLES[role]}
        return cls(**{**values, **overrides})

    def to_argv(self, role: str) -> list[str]:
        """``role``'s flags for these settings: a child process parses them back to the same values.
        Switches appear only when they differ from the default; unset optional values not at all."""
        argv: list[str] = []
        for f in _fields(role):
            value = getattr(self, f.name)
            flag = f.metadata["flags"][0]
            if f.metadata["type"] is None:
                if value != f.default:
                    argv.append(flag)
            elif value is not None:
                argv += [flag, str(value)]
        return argv


def settings_of(config_cls, engine: EngineArgs, **given) -> dict:
    """Keyword arguments for ``config_cls``: each of its fields named as an engine setting takes that
    setting's value, by name, and ``given`` (values the setting does not hold as is: a process's rank,
    a unit conversion) wins over them. A new setting is its field here and a field of the same name in
    the config that reads it, never a copied line."""
    names = {f.name for f in fields(EngineArgs)}
    return {f.name: getattr(engine, f.name) for f in fields(config_cls) if f.name in names} | given


def _fields(role: str) -> list[Field]:
    names = ROLES[role]
    return [f for f in fields(EngineArgs) if f.name in names]


# The settings each role takes, in the order of the fields. Processes: scheduler, worker; launchers: serve,
# offline (the LLM takes every setting as a keyword); benchmarks, whose --seed and --model mean other things.
_SCHEDULER = ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_prefill_tokens_with_decodes",
              "max_model_len", "enable_prefix_caching", "async_scheduling", "tensor_parallel_size", "max_num_waiting",
              "step_timeout", "heartbeat_timeout", "kv_events_endpoint", "kv_events_topic")
_WORKER = ("model", "device", "dtype", "block_size", "kv_cache_memory", "gpu_memory_utilization", "max_num_seqs",
           "max_num_batched_tokens", "swap_space", "enforce_eager", "load_format", "max_num_blocks",
           "kv_cache_dtype", "quantization", "fp8_lm_head", "seed", "tensor_parallel_size")
_LAUNCHER = ("model", "device", "dtype", "block_size", "kv_cache_memory", "gpu_memory_utilization", "max_num_seqs",
             "max_num_batched_tokens", "max_prefill_tokens_with_decodes", "max_model_len", "enable_prefix_caching",
             "async_scheduling", "swap_space", "enforce_eager", "load_format", "kv_cache_dtype", "quantization",
             "fp8_lm_head", "calculate_kv_scales", "tensor_parallel_size", "step_timeout", "heartbeat_timeout")
ROLES: dict[str, tuple[str, ...]] = {
    "scheduler": _SCHEDULER,
    "worker": _WORKER,
    "serve": (*_LAUNCHER, "seed", "max_num_waiting", "kv_events_endpoint", "kv_events_topic"),
    "offline": _LAUNCHER,  # its --seed is the requests' seed
    "bench-throughput": ("device", "block_size", "kv_cache_memory", "gpu_memory_utilization", "max_num_seqs",
                         "max_num_batched_tokens", "max_prefill_tokens_with_decodes", "enforce_eager",
                         "async_scheduling", "kv_cache_dtype", "quantization", "fp8_lm_head", "tensor_parallel_size"),
    "bench-serving": ("device", "max_num_seqs", "max_num_batched_tokens", "max_prefill_tokens_with_decodes",
                      "tensor_parallel_size"),
    "bench-memory": ("device", "block_size"),
    "bench-soak": ("device", "kv_cache_memory", "max_num_seqs"),  # of the service it starts
    "bench-scheduler": ("block_size",),
}

DEFAULTS = EngineArgs()
