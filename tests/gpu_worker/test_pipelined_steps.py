"""Steps launched before the previous one is finished (ModelRunner.can_follow / launch / finish), in
the order the worker process and EngineCore produce them: a real demo model, the real scheduler with
schedule_ahead, plans through their wire encoding. The tokens must equal those of one step at a time."""

from collections import deque

import pytest
import torch

import clients  # noqa: F401
from gpu_worker.step_io import StepPlan, decode_plan
from gpu_worker.worker import Worker, WorkerConfig
from pagedserve.internal.v1 import worker_pb2
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.step_plan import decode_result, encode_step
from tests.factories import make_checkpoint, random_prompts
from tests.scheduler_svc.factories import params

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])]


def plan_of(out) -> StepPlan:
    """The plan as a worker gets it: through the wire encoding, decoded at its edge."""
    return decode_plan(worker_pb2.WorkerCommand.FromString(encode_step(out)).step)


def run(path, device: str, pipelined: bool, odd_params: dict | None = None):
    """``odd_params``: extra sampling parameters of every other request."""
    worker = Worker(WorkerConfig(model=str(path), scheduler_address="inproc://unused", device=device,
                                 kv_cache_memory=2**22, max_num_seqs=16, dtype="float32"))
    num_blocks = 128
    worker.runner.allocate_kv(num_blocks, torch.float32)
    worker.runner.capture_graphs()  # CUDA only: decode steps then replay graphs
    follows = []
    can_follow = worker.runner.can_follow
    worker.runner.can_follow = lambda plan, prev: follows.append(can_follow(plan, prev)) or follows[-1]

    sched = Scheduler(SchedulerConfig(block_size=16, max_num_seqs=16, max_num_batched_tokens=256), num_blocks,
                      worker.model_config.max_model_len, worker.model_config.eos_token_ids, vocab_size=1000)
    prompts = random_prompts([1, 7, 16, 17, 40, 90, 130, 33], 1000, seed=3)
    for i, prompt in enumerate(prompts):  # EOS on: sequences that end early take the extra-token path
        sched.add_request(0, f"r{i}", prompt, params(max_tokens=5 + 7 * i, **((odd_params or {}) if i % 2 else {})))
    tokens: dict[str, list[int]] = {}
    replies: deque = deque()
    in_flight: deque = deque()
    pending = None
    while sched.has_work() or in_flight:
        if not in_flight:
            in_flight.append(sched.schedule())
            pending = worker.step(plan_of(in_flight[-1]), pending, replies.append)
        ahead = sched.schedule_ahead(in_flight[-1]) if pipelined else None
        if ahead is not None:  # arrives while the previous step may still be pending, as in the worker loop
            in_flight.append(ahead)
            pending = worker.step(plan_of(ahead), pending, replies.append)
        out = in_flight.popleft()
        if not replies:  # the worker had nothing else to do: it finishes the step and replies
            replies.append(worker.finish(pending))
            pending = None
        result = replies.popleft().step_result
        assert result.step_id == out.step_id and not result.error, result.error
        decoded = decode_result(result)
        for o in sched.update(out, decoded.sampled, decoded.logprobs, decoded.top):
            tokens.setdefault(o.seq.request.request_id, []).extend(o.token_ids)
    assert pending is None and not replies
    assert sched.pool.num_free_blocks == num_blocks
    return tokens, follows


@pytest.mark.parametrize("device", DEVICES)
def test_steps_launched_ahead_give_the_tokens_of_one_step_at_a_time(tmp_path, device):
    path = make_checkpoint(tmp_path / "llama")
    sequential, follows = run(path, device, pipelined=False)
    assert not any(follows)
    pipelined, follows = run(path, device, pipelined=True)
    assert sum(follows) >= 10, f"only {sum(follows)} of {len(follows)} steps followed an unfinished one"
    assert pipelined == sequential
    assert len(sequential) == 8 and all(sequential.values())


@pytest.mark.parametrize("odd_params", [
    {"min_tokens": 4}, {"logit_bias": {7: 3.0}}, {"presence_penalty": 0.5, "frequency_penalty": 0.5},
    {"prompt_logprobs": 2},
], ids=["min_tokens", "logit_bias", "penalties", "prompt_logprobs"])
def test_greedy_requests_with_logit_adjustments_are_never_argmaxed_ahead(tmp_path, odd_params):
    """Greedy requests whose logits change before the argmax (or that need prompt logprobs) take the host
    path: pipelined steps still give the tokens of one step at a time, and they differ from plain greedy."""
    path = make_checkpoint(tmp_path / "llama")
    sequential, _ = run(path, "cpu", pipelined=False, odd_params=odd_params)
    pipelined, follows = run(path, "cpu", pipelined=True, odd_params=odd_params)
    assert pipelined == sequential
    if "prompt_logprobs" in odd_params:  # needed during prefill only: decode steps still follow
        assert any(follows)
    plain, _ = run(path, "cpu", pipelined=False)
    changed = [r for r in sequential if sequential[r] != plain[r]]
    assert all(int(r[1:]) % 2 for r in changed)  # only the odd requests can change
    if "logit_bias" in odd_params or "presence_penalty" in odd_params:  # (min_tokens: no early EOS here)
        assert changed, "the parameter must change some greedy output"
