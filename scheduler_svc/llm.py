"""Offline API: ``LLM(model_dir).generate(prompts, params)``.

It starts a scheduler process and the worker processes (``engine_commands``, as ``pagedserve serve``
does) and talks to the scheduler over the same gateway<->scheduler gRPC stream and the same ZeroMQ
StepPlans that serving uses. The text side is the gateway's too: its prompt checks, and per sample a
``SampleStream`` (incremental detokenization, stop strings, stop tokens), so a completion here equals
what a client of ``pagedserve serve`` receives for the same request.
"""

from __future__ import annotations

import queue
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc

import clients  # noqa: F401
from gpu_worker.engine_args import EngineArgs, check_device_present
from gpu_worker.model_files import resolve_model
from gpu_worker.sampling_params import InvalidField, SamplingParams
from pagedserve.internal.v1 import scheduler_pb2, scheduler_pb2_grpc
from pagedserve.v1 import generation_pb2
from scheduler_svc.finish_reason import FinishReason
from scheduler_svc.gateway.detokenizer import byte_fallback_ids
from scheduler_svc.gateway.response_stream import SampleStream, stop_token_ids
from scheduler_svc.gateway.tokenizer import Tokenizer, has_tokenizer
from scheduler_svc.gateway.validation import ModelLimits, text_prompt, token_prompt
from scheduler_svc.launcher import ProcessGroup, engine_commands

_NO_USAGE = generation_pb2.Usage()  # SampleStream reports usage; the offline results do not carry it


@dataclass(slots=True)
class CompletionOutput:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[float] = field(default_factory=list)
    # Per token, its top_logprobs most likely alternatives (token id, log probability), best first.
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


@dataclass(slots=True)
class RequestOutput:
    """One prompt's completions: n samples by index, or beam_width beams best first."""

    index: int
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # With SamplingParams.prompt_logprobs: per prompt token its log probability (None for the first)
    # and its alternatives (token id, log probability), best first.
    prompt_logprobs: list[float | None] = field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


@dataclass(slots=True)
class _Running:
    """A submitted prompt: its result and one SampleStream per sample (or beam)."""

    result: RequestOutput
    samples: list[SampleStream]

    def take(self, request_id: str, index: int) -> None:
        """Moves what sample ``index`` has to show into its CompletionOutput."""
        resp = self.samples[index].take_response(request_id, _NO_USAGE)
        if resp is None:
            return
        out = self.result.outputs[index]
        out.token_ids += resp.token_ids
        out.text += resp.text
        out.logprobs += [lp.logprob for lp in resp.logprobs]
        if self.samples[index].params.top_logprobs:
            out.top_logprobs += [[(t.token_id, t.logprob) for t in lp.top] for lp in resp.logprobs]
        if resp.finish_reason:
            out.finish_reason = FinishReason.of_public(resp.finish_reason).label


class LLM:
    def __init__(self, model: str | Path | EngineArgs, *, startup_timeout_s: float = 600.0,
                 **engine_args: Any) -> None:
        """``model``: a checkpoint directory with engine settings as keywords (the fields of EngineArgs:
        device, dtype, block_size, kv_cache_memory, ...), or an EngineArgs (keywords then replace its
        fields). Raises ValueError for a setting that breaks its rule. The waiting queue is unbounded
        (one caller submits whole batches at once) unless ``max_num_waiting`` is given as a keyword."""
        engine_args.setdefault("max_num_waiting", 0)
        if isinstance(model, EngineArgs):
            self.engine = replace(model, **engine_args)
        else:
            self.engine = EngineArgs(model=str(model), **engine_args)
        self.model = Path(self.engine.model)
        try:
            resolve_model(self.model)  # a Hugging Face directory or a GGUF checkpoint
        except (OSError, ValueError) as exc:
            raise ValueError(f"model: {exc}") from None
        check_device_present(self.engine.device, self.engine.tensor_parallel_size)  # before any process
        # Without a tokenizer (benchmark shapes) prompts must be token ids and texts stay empty.
        self.tokenizer = Tokenizer(self.model) if has_tokenizer(self.model) else None
        self._byte_token_ids = frozenset() if self.tokenizer is None else byte_fallback_ids(
            self.tokenizer.id_to_token, self.tokenizer.vocab_size)
        self._tmp = Path(tempfile.mkdtemp(prefix="pagedserve-"))
        self._procs = ProcessGroup(self._tmp)
        sched_addr = f"unix://{self._tmp}/scheduler.sock"
        for name, command in engine_commands(self.engine, sched_addr, f"ipc://{self._tmp}/workers.sock"):
            self._procs.start(name, command)
        self._channel = grpc.insecure_channel(sched_addr)
        self._stub = scheduler_pb2_grpc.SchedulerServiceStub(self._channel)
        try:
            self.info = self._wait_ready(startup_timeout_s)
        except BaseException:
            self.close()
            raise
        self._limits = ModelLimits(self.model.name, self.info.vocab_size, self.info.max_model_len,
                                   self.tokenizer.max_token_bytes if self.tokenizer is not None else None)
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
        ``on_finish(i)`` is called as prompt i completes (progress bars). Invalid input raises InvalidField,
        a ValueError that names the field (``prompts[i]``, ``max_tokens``, ...)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        if not prompts:
            raise InvalidField("prompts", "must not be empty")
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise InvalidField("params", f"{len(params_list)} params for {len(prompts)} prompts")
        token_lists = [self._prompt_token_ids(f"prompts[{i}]", p) for i, p in enumerate(prompts)]
        for i, p in enumerate(params_list):
            if not isinstance(p, SamplingParams):
                raise InvalidField(f"params[{i}]", "must be a SamplingParams")
        for c in dict.fromkeys(p.constraint for p in params_list if p.constraint is not None):
            check_constraint(c)  # as the gateway does: a bad grammar never reaches the engine
        return self._run(token_lists, params_list, on_finish)

    def _prompt_token_ids(self, name: str, prompt) -> list[int]:
        """The gateway's prompt checks, naming the prompt by its place in the list."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidField(name, "this model has no tokenizer.json: give token ids")
            return text_prompt(prompt, self._limits, self.tokenizer.encode, name)
        if isinstance(prompt, list | tuple):
            return token_prompt(prompt, self._limits, name)
        raise InvalidField(name, f"must be a string or a list of token ids, got {type(prompt)}")

    def _new_sample(self, index: int, params: SamplingParams) -> SampleStream:
        decode = self.tokenizer.decode if self.tokenizer is not None else _no_text
        return SampleStream(index, params, decode, stop_token_ids(params, self.info.eos_token_ids),
                            self._byte_token_ids)

    def _run(self, token_lists: list[list[int]], params_list: list[SamplingParams],
             on_finish: Callable[[int], None] | None = None) -> list[RequestOutput]:
        up: queue.Queue = queue.Queue()  # GatewayMessages to the scheduler; None ends the stream
        base = self._next_request
        self._next_request += len(token_lists)
        running: dict[str, _Running] = {}
        for i, (ids, p) in enumerate(zip(token_lists, params_list, strict=True)):
            width = max(p.n, p.beam_width)
            running[f"offline-{base + i}"] = _Running(
                RequestOutput(i, ids, [CompletionOutput(j, [], "", None) for j in range(width)]),
                [self._new_sample(j, p) for j in range(width)],
            )
        results = [r.result for r in running.values()]
        for rid, r in running.items():
            up.put(scheduler_pb2.GatewayMessage(submit=scheduler_pb2.Submit(
                request_id=rid, prompt_token_ids=r.result.prompt_token_ids,
                sampling_params=params_list[r.result.index].to_proto(),
            )))
        stream = self._stub.Connect(iter(up.get, None))
        try:
            for event in stream:
                for o in event.outputs:
                    r = running.get(o.request_id)
                    if r is None:
                        continue
                    if o.finish_reason == FinishReason.ERROR:
                        if o.error_field:
                            raise InvalidField(o.error_field, o.error)
                        raise RuntimeError(o.error)
                    r.result.num_cached_tokens = o.num_cached_tokens
                    if o.HasField("prompt_logprobs"):
                        _add_prompt_logprobs(r.result, o.prompt_logprobs)
                    r.samples[o.index].feed(o)
                    r.take(o.request_id, o.index)
                    if all(s.finished for s in r.samples):
                        if not all(s.upstream_finished for s in r.samples):  # a stop string ended it here
                            up.put(scheduler_pb2.GatewayMessage(abort=scheduler_pb2.Abort(request_id=o.request_id)))
                        del running[o.request_id]
                        if on_finish is not None:
                            on_finish(r.result.index)
                if not running:
                    break
        finally:
            up.put(None)
            stream.cancel()
        return results

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


def check_constraint(constraint) -> None:
    from gpu_worker.constraint import ConstraintError

    try:
        constraint.check()
    except ConstraintError as exc:
        raise InvalidField("constraint", str(exc)) from None


def _no_text(token_ids: list[int]) -> str:
    """The decoder of a model without tokenizer.json: its completions are token ids only."""
    return ""


def _add_prompt_logprobs(result: RequestOutput, p: scheduler_pb2.PromptLogprobs) -> None:
    if not result.prompt_logprobs:
        result.prompt_logprobs.append(None)  # the first prompt token has no logprob
        result.prompt_top_logprobs.append([])
    result.prompt_logprobs.extend(p.logprobs)
    for j in range(len(p.logprobs)):
        top = p.top[j] if j < len(p.top) else None
        result.prompt_top_logprobs.append(list(zip(top.token_ids, top.logprobs, strict=True)) if top else [])
