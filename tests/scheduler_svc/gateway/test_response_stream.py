"""One sample's outputs become public responses: coalesced, stop tokens counted but not shown, stop
strings cut the text and drop later tokens, finish reasons and usage on the last response."""

import clients  # noqa: F401

# isort: split
from gpu_worker.sampling_params import SamplingParams
from pagedserve.internal.v1 import scheduler_pb2
from pagedserve.v1 import generation_pb2
from scheduler_svc.gateway.response_stream import SampleStream

EOS = 1
USAGE = generation_pb2.Usage(prompt_tokens=3)


def decode(ids: list[int]) -> str:
    """A stand-in tokenizer: token id i is the character chr(i); EOS decodes to nothing."""
    return "".join(chr(i) for i in ids if i != EOS)


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def sample(**params) -> SampleStream:
    params.setdefault("max_tokens", 50)
    p = SamplingParams(**params)
    return SampleStream(0, p, decode, frozenset({EOS, *p.stop_token_ids}))


def output(token_ids, reason=scheduler_pb2.FINISH_REASON_UNSPECIFIED, logprobs=()):
    return scheduler_pb2.RequestOutput(request_id="r", token_ids=token_ids, finish_reason=reason, logprobs=logprobs)


def test_outputs_between_responses_are_coalesced():
    s = sample()
    s.feed(output(ids("ab")))
    s.feed(output(ids("c")))
    resp = s.take_response("r", USAGE)
    assert (list(resp.token_ids), resp.text, resp.finish_reason) == (ids("abc"), "abc", 0)
    assert not resp.HasField("usage")
    assert s.take_response("r", USAGE) is None


def test_scheduler_finish_ends_the_sample_with_usage():
    s = sample()
    s.feed(output(ids("hi"), scheduler_pb2.FINISH_REASON_LENGTH))
    resp = s.take_response("r", USAGE)
    assert resp.finish_reason == generation_pb2.FINISH_REASON_LENGTH and resp.text == "hi"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (3, 2)
    assert s.upstream_finished and s.sent_final


def test_stop_token_is_counted_but_not_shown():
    s = sample(stop_token_ids=(ord("!"),))
    s.feed(output(ids("ok!")))
    resp = s.take_response("r", USAGE)
    assert (list(resp.token_ids), resp.text) == (ids("ok!"), "ok")
    assert resp.finish_reason == generation_pb2.FINISH_REASON_STOP and resp.usage.completion_tokens == 3
    assert not s.upstream_finished  # the gateway ended it: the scheduler must get an Abort


def test_eos_ends_the_sample():
    s = sample()
    s.feed(output([ord("a"), EOS], scheduler_pb2.FINISH_REASON_STOP))
    resp = s.take_response("r", USAGE)
    assert (resp.text, resp.finish_reason, s.upstream_finished) == ("a", generation_pb2.FINISH_REASON_STOP, True)


def test_stop_string_cuts_text_and_drops_later_tokens():
    s = sample(stop=("lo w",))
    s.feed(output(ids("hel")))
    first = s.take_response("r", USAGE)
    assert first.text == "he"  # "l" may start the stop string
    s.feed(output(ids("lo world")))  # "w" completes it; "orld" is never sent
    last = s.take_response("r", USAGE)
    assert (list(last.token_ids), last.text) == (ids("lo w"), "l")
    assert last.finish_reason == generation_pb2.FINISH_REASON_STOP and last.usage.completion_tokens == 7
    s.feed(output(ids("x")))
    assert s.take_response("r", USAGE) is None


def test_held_back_text_is_released_at_the_end():
    s = sample(stop=("xyz",))
    s.feed(output(ids("abxy"), scheduler_pb2.FINISH_REASON_LENGTH))
    assert s.take_response("r", USAGE).text == "abxy"


def test_max_tokens_is_enforced_here_too():
    s = sample(max_tokens=2)
    s.feed(output(ids("abc")))
    resp = s.take_response("r", USAGE)
    assert (resp.text, resp.finish_reason) == ("ab", generation_pb2.FINISH_REASON_LENGTH)


def test_logprobs_travel_with_their_tokens():
    s = sample(logprobs=True)
    out = output(ids("ab"), logprobs=[-0.5, -1.5])
    out.top_logprobs.add(token_ids=[5, 6], logprobs=[-0.1, -0.2])
    s.feed(out)
    resp = s.take_response("r", USAGE)
    assert [(lp.token_id, lp.logprob) for lp in resp.logprobs] == [(ord("a"), -0.5), (ord("b"), -1.5)]
    assert [(t.token_id, round(t.logprob, 3)) for t in resp.logprobs[0].top] == [(5, -0.1), (6, -0.2)]
    assert not resp.logprobs[1].top


def test_shutdown_abort_flushes():
    s = sample(stop=("zz",))
    s.feed(output(ids("az")))
    assert s.take_response("r", USAGE).text == "a"
    s.finish(generation_pb2.FINISH_REASON_ABORT)
    resp = s.take_response("r", USAGE)
    assert (resp.text, resp.finish_reason) == ("z", generation_pb2.FINISH_REASON_ABORT)


def test_a_beam_arrives_whole_when_the_search_ends():
    s = sample(beam_width=2, stop=("c",))
    s.feed(output(ids("zz")))  # not sent by the scheduler for beams; ignored if it were
    assert s.take_response("r", USAGE) is None
    final = scheduler_pb2.RequestOutput(request_id="r", index=1, finish_reason=scheduler_pb2.FINISH_REASON_LENGTH,
                                        final_token_ids=ids("abcd"))
    s.feed(final)
    resp = s.take_response("r", USAGE)
    assert (list(resp.token_ids), resp.text) == (ids("abc"), "ab")
    assert resp.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert s.upstream_finished


def test_min_tokens_holds_back_stop_tokens_and_strings():
    """As vLLM: stop tokens end the sample from min_tokens outputs on, stop strings after min_tokens."""
    s = sample(min_tokens=3, stop=("b",))
    s.feed(output(ids("ab") + [EOS]))  # EOS as the 3rd output: it stops (3 >= min_tokens)
    resp = s.take_response("r", USAGE)
    assert (resp.text, resp.finish_reason) == ("ab", generation_pb2.FINISH_REASON_STOP)
    s = sample(min_tokens=3, stop=("b",))
    s.feed(output(ids("abcb")))  # the first "b" is within min_tokens; the second ends it
    resp = s.take_response("r", USAGE)
    assert (resp.text, resp.finish_reason) == ("abc", generation_pb2.FINISH_REASON_STOP)
    s = sample(min_tokens=3)
    s.feed(output([EOS] + ids("a")))  # (never sampled: the worker bans it) does not stop early
    assert not s.finished
