"""The worker process: loads the model, reports how many KV blocks fit, then executes StepPlans.

It talks to the scheduler over one ZeroMQ DEALER socket: WorkerHello first, then one reply per command
(CacheReady for InitCache, StepResult for each StepPlan). Errors in a step travel in-band in the
StepResult; errors before serving are sent as fatal_error and the process exits non-zero. A thread
beats on a socket of its own meanwhile (gpu_worker.heartbeat), so that the scheduler tells a long step
from a stopped or frozen process.

With tensor parallelism each worker is one rank (gpu_worker.distributed): every rank loads its shard,
reports the blocks that fit its share of the KV heads, and executes every StepPlan; rank 0's StepResult
is the one the scheduler keeps. A step error on one rank is fatal there (its peers may be waiting for it
in a collective), and the engine fails.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass

import torch
import zmq

import clients  # noqa: F401
from gpu_worker import lifetime, log
from gpu_worker.distributed import (
    check_tensor_parallel,
    default_init_method,
    init_tensor_parallel,
    shutdown_tensor_parallel,
)
from gpu_worker.engine_args import (
    CPU_KV_CACHE_MEMORY,
    DEFAULTS,
    EngineArgs,
    check,
    check_device_present,
    settings_of,
)
from gpu_worker.grammar import GrammarCache
from gpu_worker.heartbeat import start_heartbeat
from gpu_worker.loader import load_model
from gpu_worker.model_config import ModelConfig
from gpu_worker.model_runner import ModelRunner, PendingStep
from gpu_worker.models.parallel import SINGLE
from gpu_worker.sampling_params import SamplingParams
from gpu_worker.step_io import NewSequence, StepOutput, StepPlan, decode_plan
from gpu_worker.step_profile import StepProfiler
from pagedserve.internal.v1 import worker_pb2

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """One worker process: the engine settings that a worker uses (EngineArgs' defaults and checks, sizes
    in bytes), with this process's rank and the scheduler's address."""

    model: str
    scheduler_address: str
    device: str = DEFAULTS.device
    dtype: str = DEFAULTS.dtype
    block_size: int = DEFAULTS.block_size
    rank: int = 0
    world_size: int = DEFAULTS.tensor_parallel_size
    kv_cache_memory: int | None = DEFAULTS.kv_cache_memory  # bytes of KV pool; None: sized by device (EngineArgs)
    gpu_memory_utilization: float = DEFAULTS.gpu_memory_utilization
    max_num_batched_tokens: int = DEFAULTS.max_num_batched_tokens  # largest step, for the profiling forward
    max_num_seqs: int = DEFAULTS.max_num_seqs  # largest decode batch, for CUDA graphs
    enforce_eager: bool = DEFAULTS.enforce_eager  # no CUDA graphs
    load_format: str = DEFAULTS.load_format  # "dummy": random weights from config.json alone (benchmarks)
    max_num_blocks: int | None = DEFAULTS.max_num_blocks  # cap on the pool, e.g. to make memory the limit
    seed: int = DEFAULTS.seed
    kv_cache_dtype: str = DEFAULTS.kv_cache_dtype  # "fp8": an e4m3 pool
    quantization: str = DEFAULTS.quantization  # "fp8": e4m3 linear weights (gpu_worker/fp8_linear.py)
    fp8_lm_head: bool = DEFAULTS.fp8_lm_head
    swap_space: int = DEFAULTS.swap_space_bytes  # bytes of CPU swap pool (preempted sequence groups)
    dist_init_method: str | None = None  # rendezvous of the ranks; None: derived from scheduler_address

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        check(self, ("device", "dtype", "block_size", "kv_cache_memory", "gpu_memory_utilization",
                     "max_num_batched_tokens", "max_num_seqs", "load_format", "max_num_blocks", "swap_space",
                     "kv_cache_dtype", "quantization"))

    @classmethod
    def from_engine_args(cls, engine: EngineArgs, scheduler_address: str, rank: int = 0,
                         dist_init_method: str | None = None) -> WorkerConfig:
        # By name (settings_of), but for the two whose names or units differ here.
        return cls(**settings_of(cls, engine, scheduler_address=scheduler_address, rank=rank,
                                 world_size=engine.tensor_parallel_size, swap_space=engine.swap_space_bytes,
                                 dist_init_method=dist_init_method))

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float32 if self.device == "cpu" else torch.bfloat16
        return _DTYPES[self.dtype]

    @property
    def kv_torch_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self.kv_cache_dtype.startswith("fp8") else self.torch_dtype


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        check_device_present(config.device)  # one line on a host without that GPU, not set_device's AttributeError
        self.device = torch.device(config.device)
        if self.device.type == "cuda":
            if self.device.index is None:
                self.device = torch.device("cuda", 0)
            torch.cuda.set_device(self.device)
        torch.manual_seed(config.seed)
        n = config.world_size
        self.tp = SINGLE
        if n > 1:
            check_tensor_parallel(ModelConfig.from_dir(config.model), n)  # before the rendezvous and any read
            init_method = config.dist_init_method or default_init_method(config.scheduler_address)
            self.tp = init_tensor_parallel(config.rank, n, init_method, self.device)
        self.model, model_config = load_model(
            config.model, self.device, config.torch_dtype, load_format=config.load_format, tp=self.tp,
            quantization=config.quantization, fp8_lm_head=config.fp8_lm_head,
        )
        self.model_config = model_config.for_rank(n)  # this rank's heads: its KV pool holds its KV heads
        self.runner = self._new_runner()

    def _new_runner(self) -> ModelRunner:
        cfg = self.config
        mc = self.model_config
        return ModelRunner(self.model, mc, self.device, cfg.block_size,
                           max_num_seqs=cfg.max_num_seqs, use_cuda_graphs=not cfg.enforce_eager,
                           grammars=GrammarCache(cfg.model, mc.vocab_size, mc.eos_token_ids))

    def num_blocks_that_fit(self) -> int:
        cfg, mc = self.config, self.model_config
        per_block = cfg.block_size * mc.kv_bytes_per_token(cfg.kv_torch_dtype)
        if cfg.kv_cache_memory is not None:
            fit = cfg.kv_cache_memory // per_block
        elif self.device.type == "cpu":
            fit = CPU_KV_CACHE_MEMORY // per_block
        else:
            fit = self._profile_cuda(per_block)
        return fit if cfg.max_num_blocks is None else min(fit, cfg.max_num_blocks)

    def num_cpu_blocks_that_fit(self) -> int:
        cfg, mc = self.config, self.model_config
        per_block = cfg.block_size * mc.kv_bytes_per_token(cfg.kv_torch_dtype)
        return cfg.swap_space // per_block

    def profile_step(self) -> int:
        """Runs the largest step once (max_num_batched_tokens of prefill, split into sequences no longer
        than the context length) over a scratch pool; returns the scratch pool's size in blocks."""
        cfg = self.config
        bs = cfg.block_size
        seq_len = min(cfg.max_num_batched_tokens, self.model_config.max_model_len)
        lens = [seq_len] * (cfg.max_num_batched_tokens // seq_len)
        if cfg.max_num_batched_tokens % seq_len:
            lens.append(cfg.max_num_batched_tokens % seq_len)
        num_blocks = sum(-(-n // bs) for n in lens)
        self.runner.allocate_kv(num_blocks, cfg.kv_torch_dtype)
        plan = StepPlan(step_id=0)
        first_block = 0
        for i, n in enumerate(lens):
            nb = -(-n // bs)
            plan.new_seqs.append(NewSequence(i, [0] * n, n, 0, n, list(range(first_block, first_block + nb)),
                                             SamplingParams(max_tokens=1)))
            first_block += nb
        self.runner.execute(plan)
        self.runner = self._new_runner()
        return num_blocks

    def _profile_cuda(self, per_block: int) -> int:
        """Sizes the pool from what remains under the utilization cap after the largest step."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        scratch_blocks = self.profile_step()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - scratch_blocks * per_block
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        budget = total * self.config.gpu_memory_utilization - used_by_others - peak
        return max(0, int(budget // per_block))

    def hello(self) -> worker_pb2.WorkerReply:
        mc = self.model_config
        reply = worker_pb2.WorkerReply()
        reply.hello.CopyFrom(
            worker_pb2.WorkerHello(
                rank=self.config.rank,
                world_size=self.config.world_size,
                num_blocks=self.num_blocks_that_fit(),
                num_cpu_blocks=self.num_cpu_blocks_that_fit(),
                block_size=self.config.block_size,
                max_model_len=mc.max_model_len,
                vocab_size=mc.vocab_size,
                eos_token_ids=mc.eos_token_ids,
                architecture=mc.architecture,
                dtype=str(self.config.torch_dtype).removeprefix("torch."),
            )
        )
        return reply

    def step(self, plan: StepPlan, pending: PendingStep | None, send) -> PendingStep | None:
        """Launches ``plan``; ``send`` gets the replies in step order. A step still on the device is
        finished first unless the plan can follow it, in which case it is finished right after the
        plan's launch (the device runs both back to back). Returns the step now left unfinished."""
        follow = pending is not None and self.runner.can_follow(plan, pending)
        if pending is not None and not follow:
            send(self.finish(pending))
            pending = None
        try:
            launched = self.runner.launch(plan, pending)
        except Exception as exc:  # in-band: the scheduler fails this step's requests
            if pending is not None:
                send(self.finish(pending))
            send(self._step_error(plan.step_id, exc))
            return None
        if pending is not None:
            send(self.finish(pending))
        if isinstance(launched, PendingStep):
            return launched
        send(self._reply(launched))
        return None

    def finish(self, pending: PendingStep) -> worker_pb2.WorkerReply:
        try:
            return self._reply(self.runner.finish(pending))
        except Exception as exc:
            return self._step_error(pending.result.step_id, exc)

    def _step_error(self, step_id: int, exc: Exception) -> worker_pb2.WorkerReply:
        traceback.print_exc()
        if self.config.world_size > 1:
            raise RankFailed(f"rank {self.config.rank}, step {step_id}: {type(exc).__name__}: {exc}") from exc
        return self._send_result(worker_pb2.StepResult(step_id=step_id, error=f"{type(exc).__name__}: {exc}"))

    def _reply(self, output: StepOutput) -> worker_pb2.WorkerReply:
        return self._send_result(output.to_proto())

    def _send_result(self, result: worker_pb2.StepResult) -> worker_pb2.WorkerReply:
        result.rank = self.config.rank
        return worker_pb2.WorkerReply(step_result=result)

    def handle(self, cmd: worker_pb2.WorkerCommand) -> worker_pb2.WorkerReply | None:
        """One command and its reply (None: shut down). The serving loop sends steps to ``step``
        instead, so that a step can follow one still on the device."""
        reply = worker_pb2.WorkerReply()
        kind = cmd.WhichOneof("kind")
        if kind == "step":
            pending = self.step(decode_plan(cmd.step), None, reply.CopyFrom)
            if pending is not None:
                reply.CopyFrom(self.finish(pending))
        elif kind == "init_cache":
            self.runner.allocate_kv(cmd.init_cache.num_blocks, self.config.kv_torch_dtype,
                                    num_cpu_blocks=cmd.init_cache.num_cpu_blocks)
            self.runner.capture_graphs()
            reply.cache_ready.rank = self.config.rank
            reply.cache_ready.num_blocks = cmd.init_cache.num_blocks
            reply.cache_ready.num_cpu_blocks = cmd.init_cache.num_cpu_blocks
        elif kind == "shutdown":
            return None
        return reply


_logger = log.get_logger()


class RankFailed(RuntimeError):
    """A step failed on this rank of several: its peers may wait for it in a collective it will never
    join, so the rank cannot go on; it reports a fatal error and exits, and the engine fails."""


def serve(config: WorkerConfig) -> int:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.IDENTITY, f"rank{config.rank}".encode())
    sock.connect(config.scheduler_address)
    beat = start_heartbeat(config.scheduler_address, f"rank{config.rank}".encode(), ctx=ctx)
    if config.world_size > 1:
        # A rank blocked in a collective whose peer died never returns to the interpreter, so a Python
        # handler would never run: SIGTERM (from the launcher, or at the parent's death) kills at once.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        # one profile per engine: rank 0's (the ranks run the same kernels on the same shapes)
        profiler = StepProfiler.from_env() if config.device != "cpu" and config.rank == 0 else None
        try:
            worker = Worker(config)
        except (ValueError, OSError) as exc:  # a setting or a checkpoint it cannot serve: one line, no traceback
            _logger.error("cannot start", rank=config.rank, error=f"{type(exc).__name__}: {exc}")
            return _fatal(sock, exc)
        hello = worker.hello()
        sock.send(hello.SerializeToString())
        _logger.info("model loaded", rank=config.rank, device=config.device, num_blocks=hello.hello.num_blocks,
                     scheduler=config.scheduler_address)
        code = _serve_steps(worker, sock, profiler)
        shutdown_tensor_parallel()  # every rank got Shutdown between steps: no collective is pending
        return code
    except Exception as exc:  # other start-up errors (bugs: the traceback helps), and RankFailed
        _logger.exception("worker failed", rank=config.rank)
        return _fatal(sock, exc)
    finally:
        beat.set()  # an in-process worker (tests) leaves no beating thread behind


def _fatal(sock: zmq.Socket, exc: BaseException) -> int:
    sock.send(worker_pb2.WorkerReply(fatal_error=f"{type(exc).__name__}: {exc}").SerializeToString())
    time.sleep(0.2)
    return 1


def _serve_steps(worker: Worker, sock: zmq.Socket, profiler: StepProfiler | None) -> int:
    """Answers commands until Shutdown (returns 0)."""

    def send(reply: worker_pb2.WorkerReply) -> None:
        sock.send(reply.SerializeToString())

    pending: PendingStep | None = None  # launched, tokens not read back, reply not sent
    while True:
        if pending is not None:
            # The next plan usually arrives while the device runs this step (the scheduler plans
            # ahead): take it if it comes before the step ends, else reply now.
            while not pending.done() and not sock.poll(1):
                pass
            if not sock.poll(0):
                send(worker.finish(pending))
                pending = None
                continue
        cmd = worker_pb2.WorkerCommand.FromString(sock.recv())
        if cmd.WhichOneof("kind") == "step":
            plan = decode_plan(cmd.step)
            if profiler is not None:
                profiler.observe(plan)
            pending = worker.step(plan, pending, send)
            continue
        if pending is not None:
            send(worker.finish(pending))
            pending = None
        reply = worker.handle(cmd)
        if reply is None:
            if profiler is not None:
                profiler.close()
            return 0
        send(reply)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="pagedserve worker")
    p.description = "Run one GPU (or CPU) worker: load the model, own the KV pool, execute StepPlans."
    p.add_argument("--scheduler", required=True, dest="scheduler_address",
                   help="ZeroMQ address of the scheduler's worker socket, e.g. tcp://127.0.0.1:5557")
    p.add_argument("--rank", type=int, default=0, help="tensor-parallel rank (default 0)")
    EngineArgs.add_args(p, "worker")
    lifetime.add_argument(p)
    log.add_arguments(p)
    p.add_argument("--dist-init-method", default=None,
                   help="rendezvous of the tensor-parallel ranks, e.g. tcp://HOST:PORT or file:///PATH (default: "
                   "from --scheduler: ipc://DIR/X -> file://DIR/torch-dist-init, tcp://HOST:PORT -> tcp://HOST:PORT+1)")
    return p


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    return WorkerConfig.from_engine_args(EngineArgs.from_args(args, "worker"), args.scheduler_address, args.rank,
                                         args.dist_init_method)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.exit_with_parent:
        lifetime.exit_with_parent()
    log.configure("worker", args.log_level, args.log_format)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return serve(config)
    finally:
        # Already on the way out: a SIGTERM now (the launcher stops the group as the scheduler sends
        # Shutdown) would raise SystemExit inside an atexit callback, which Python reports as
        # "Exception ignored in atexit callback" with a traceback.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _exit_on_sigterm(*_: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second SIGTERM must not interrupt the unwinding
    sys.exit(0)


if __name__ == "__main__":
    sys.exit(main())
