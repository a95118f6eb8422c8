"""Offline API: ``LLM(model_dir).generate(prompts, params)``.

It starts a scheduler process and a worker process and talks to the scheduler over the same
gateway<->scheduler gRPC stream and the same ZeroMQ StepPlans that serving uses.
"""

from __future__ import annotations

import queue
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

import clients  # noqa: F401
from gpu_worker.model_files import resolve_model
from pagedserve.internal.v1 import scheduler_pb2, scheduler_pb2_grpc
from scheduler_svc.gateway.tokenizer import Tokenizer, has_tokenizer
from scheduler_svc.launcher import ProcessGroup, cli_command
from scheduler_svc.sampling_params import InvalidField, SamplingParams

FINISH_REASONS = {
    scheduler_pb2.FINISH_REASON_LENGTH: "length",
    scheduler_pb2.FINISH_REASON_STOP: "stop",
    scheduler_pb2.FINISH_REASON_ABORT: "abort",
    scheduler_pb2.FINISH_REASON_ERROR: "error",
}


@dataclass(slots=True)
class CompletionOutput:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[float] = field(default_factory=list)


@dataclass(slots=True)
class RequestOutput:
    """One prompt's completions: n samples by index, or beam_width beams best first."""

    index: int
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


class LLM:
    def __init__(
        self,
        model: str | Path,
        *,
        device: str = "cpu",
        dtype: str = "auto",
        block_size: int = 16,
        kv_cache_memory: str | int = "256MiB",
        gpu_memory_utilization: float = 0.9,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        max_model_len: int | None = None,
        seed: int = 0,
        load_format: str = "auto",
        enforce_eager: bool = False,
        max_num_blocks: int | None = None,
        enable_prefix_caching: bool = True,
        async_scheduling: bool = True,
        swap_space: float = 4.0,
        startup_timeout_s: float = 600.0,
    ) -> None:
        self.model = Path(model)
        try:
            resolve_model(self.model)  # a Hugging Face directory or a GGUF checkpoint
        except (OSError, ValueError) as exc:
            raise ValueError(f"model: {exc}") from None
        # Without tokenizer.json (benchmark shapes) prompts must be token ids and texts stay empty.
        self.tokenizer = Tokenizer(self.model) if has_tokenizer(self.model) else None
        self._tmp = Path(tempfile.mkdtemp(prefix="pagedserve-"))
        self._procs = ProcessGroup(self._tmp)
        sched_addr = f"unix://{self._tmp}/scheduler.sock"
        worker_addr = f"ipc://{self._tmp}/workers.sock"
        sizes = [
            "--block-size", str(block_size),
            "--max-num-batched-tokens", str(max_num_batched_tokens),
        ]
        sched_args = [
            "--listen", sched_addr, "--workers", worker_addr, "--max-num-seqs", str(max_num_seqs), *sizes,
        ]
        if max_model_len is not None:
            sched_args += ["--max-model-len", str(max_model_len)]
        if not enable_prefix_caching:
            sched_args.append("--no-prefix-caching")
        if not async_scheduling:
            sched_args.append("--no-async-scheduling")
        self._procs.start("scheduler", cli_command("scheduler", *sched_args))
        self._procs.start("worker", cli_command(
            "worker", "--model", str(self.model), "--scheduler", worker_addr, "--device", device,
            "--dtype", dtype, "--kv-cache-memory", str(kv_cache_memory),
            "--gpu-memory-utilization", str(gpu_memory_utilization), "--seed", str(seed),
            "--max-num-seqs", str(max_num_seqs), "--load-format", load_format, "--exit-with-parent", *sizes,
            "--swap-space", str(swap_space),
            *(["--enforce-eager"] if enforce_eager else []),
            *(["--max-num-blocks", str(max_num_blocks)] if max_num_blocks else []),
        ))
        self._channel = grpc.insecure_channel(sched_addr)
        self._stub = scheduler_pb2_grpc.SchedulerServiceStub(self._channel)
        try:
            self.info = self._wait_ready(startup_timeout_s)
        except BaseException:
            self.close()
            raise
        self._next_request = 0

    def _wait_ready(self, timeout_s: float) -> scheduler_pb2.EngineInfo:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = self._procs.first_dead()
            if dead is not None:
                logs = "\n".join(f"--- {c.name} log:\n{self._procs.log_tail(c)}" for c in self._procs.children)
                raise RuntimeError(
                    f"the {dead.name} process exited with code {dead.popen.returncode} during start-up\n{logs}"
                )
            try:
                info = self._stub.GetEngineInfo(scheduler_pb2.GetEngineInfoRequest(), timeout=2)
                if info.ready:
                    return info
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the engine was not ready within {timeout_s:.0f} s")

    def stats(self) -> scheduler_pb2.EngineStats:
        return self._stub.GetEngineInfo(scheduler_pb2.GetEngineInfoRequest(), timeout=10).stats

    # ---- generation

    def generate(
        self,
        prompts: str | list[int] | list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        on_finish: Callable[[int], None] | None = None,
    ) -> list[RequestOutput]:
        """Completes every prompt; prompts are strings or token-id lists. Returns outputs in order.
        ``on_finish(i)`` is called as prompt i completes (progress bars)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        if not prompts:
            raise InvalidField("prompts", "must not be empty")
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise InvalidField("params", f"{len(params_list)} params for {len(prompts)} prompts")
        token_lists = [self._tokenize(i, p) for i, p in enumerate(prompts)]
        for i, (ids, p) in enumerate(zip(token_lists, params_list, strict=True)):
            if not isinstance(p, SamplingParams):
                raise InvalidField(f"params[{i}]", "must be a SamplingParams")
            if len(ids) + 1 > self.info.max_model_len:
                raise InvalidField(
                    f"prompts[{i}]",
                    f"{len(ids)} tokens leave no room to generate within the context length "
                    f"{self.info.max_model_len}",
                )
        return self._run(token_lists, params_list, on_finish)

    def _tokenize(self, i: int, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidField(f"prompts[{i}]", "this model has no tokenizer.json: give token ids")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list | tuple):
            ids = list(prompt)
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.info.vocab_size]
            if bad:
                raise InvalidField(
                    f"prompts[{i}]", f"token id {bad[0]!r} is outside the vocabulary [0, {self.info.vocab_size})"
                )
        else:
            raise InvalidField(f"prompts[{i}]", f"must be a string or a list of token ids, got {type(prompt)}")
        if not ids:
            raise InvalidField(f"prompts[{i}]", "must not be empty")
        return ids

    def _run(self, token_lists: list[list[int]], params_list: list[SamplingParams],
             on_finish: Callable[[int], None] | None = None) -> list[RequestOutput]:
        up: queue.Queue = queue.Queue()
        base = self._next_request
        self._next_request += len(token_lists)
        ids = {f"offline-{base + i}": i for i in range(len(token_lists))}
        results = [
            RequestOutput(i, t, [CompletionOutput(j, [], "", None) for j in range(max(p.n, p.beam_width))])
            for i, (t, p) in enumerate(zip(token_lists, params_list, strict=True))
        ]
        for rid, i in ids.items():
            up.put(scheduler_pb2.GatewayMessage(submit=scheduler_pb2.Submit(
                request_id=rid, prompt_token_ids=token_lists[i], sampling_params=params_list[i].to_proto()
            )))
        pending = set(ids)
        stop_strings = {rid: params_list[i].stop for rid, i in ids.items()}

        def requests():
            while True:
                msg = up.get()
                if msg is None:
                    return
                yield msg

        stream = self._stub.Connect(requests())
        try:
            for event in stream:
                for o in event.outputs:
                    if o.request_id not in pending:
                        continue
                    if o.finish_reason == scheduler_pb2.FINISH_REASON_ERROR:
                        raise InvalidField(o.error_field or "request", o.error) if o.error_field else \
                            RuntimeError(o.error)
                    result = results[ids[o.request_id]]
                    result.num_cached_tokens = o.num_cached_tokens
                    out = result.outputs[o.index]
                    if out.finish_reason is not None:
                        continue  # ended here at a stop string; its sibling samples go on
                    out.token_ids += o.token_ids
                    out.logprobs += o.logprobs
                    if o.final_token_ids:
                        out.token_ids = list(o.final_token_ids)  # a finished beam
                    if o.finish_reason:
                        out.finish_reason = FINISH_REASONS[o.finish_reason]
                    elif self._hit_stop_string(out, stop_strings[o.request_id]):
                        if all(c.finish_reason is not None for c in result.outputs):
                            up.put(scheduler_pb2.GatewayMessage(abort=scheduler_pb2.Abort(request_id=o.request_id)))
                    if all(c.finish_reason is not None for c in result.outputs):
                        pending.discard(o.request_id)
                        if on_finish is not None:
                            on_finish(ids[o.request_id])
                if not pending:
                    break
        finally:
            up.put(None)
            stream.cancel()
        for r in results:
            for out in r.outputs:
                if not out.text and self.tokenizer is not None:
                    out.text = self.tokenizer.decode(out.token_ids)
        return results

    def _hit_stop_string(self, out: CompletionOutput, stops: tuple[str, ...]) -> bool:
        """Ends a completion at the first stop string; its text stops before it."""
        if not stops or self.tokenizer is None:
            return False
        text = self.tokenizer.decode(out.token_ids)
        hits = [text.find(s) for s in stops if s in text]
        if not hits:
            return False
        out.text = text[: min(hits)]
        out.finish_reason = "stop"
        return True

    # ---- lifetime

    def close(self) -> None:
        if getattr(self, "_procs", None) is None:
            return
        try:
            self._channel.close()
        except Exception:
            pass
        self._procs.stop()
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._procs = None  # type: ignore[assignment]

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
