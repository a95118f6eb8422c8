"""A synthetic engine for ``bench gateway``: the scheduler's gRPC face with no model behind it.

It speaks the real internal protocol (``SchedulerService``: GetEngineInfo, Connect) so that unmodified
gateway processes run against it, and on each Connect stream it plays the engine's part as the real
one does: one ``SchedulerEvent`` per step carrying one new token for every running request of that
stream, a request finishing with LENGTH after its ``max_tokens``, Abort honoured at the next step.
Steps follow each other as fast as the gateway takes them (``await write``: HTTP/2 flow control is the
brake), or every ``--step-ms`` to imitate an engine of that step time.

The tokens are those of a fixed multilingual passage encoded with the model's own tokenizer, each
request starting at its own offset, so the gateway detokenizes realistic text (multi-byte characters
split across byte-level pieces included) rather than random ids.

    python -m scheduler_svc.bench.synthetic_engine --model DIR --listen unix:///tmp/x.sock
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import signal
import sys
import time
from dataclasses import dataclass

import grpc

import clients  # noqa: F401
from gpu_worker import lifetime
from pagedserve.internal.v1 import scheduler_pb2, scheduler_pb2_grpc

_WORDS = (
    "the of and to in is was for on that with as by at from it an be this are or which have not "
    "paged attention block table cache token model serve request batch stream decode prefill memory "
    "copy write share free list queue step worker scheduler gateway kernel tensor layer river mountain "
    "city light night music garden apple orange number system simple little great small large water"
).split()
_FOREIGN = "café naïve über Zürich São Ελλάδα привет мир 日本語 東京 你好 世界 한국어 😀 🚀 👍🏽 ❤️".split()


def passage(num_words: int = 4000, seed: int = 0) -> str:
    """Seeded sentences of common words with some accented, Greek, Cyrillic, CJK and emoji words."""
    rng = random.Random(seed)
    sentences, n = [], 0
    while n < num_words:
        words = [rng.choice(_FOREIGN if rng.random() < 0.08 else _WORDS) for _ in range(rng.randint(6, 18))]
        n += len(words)
        sentences.append(" ".join(words).capitalize() + rng.choice(".,;!?"))
    return " ".join(sentences)


@dataclass(slots=True)
class _Running:
    request_id: str
    position: int  # next index into the passage's token ids
    remaining: int  # tokens still to generate
    num_prompt_tokens: int


class SyntheticScheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    """One engine loop (``run``) steps every open stream's running requests together, as the real
    engine does; each stream's handler writes its events. A stream holds at most one event not yet
    written, so the loop runs as fast as the slowest gateway takes its events, and no faster than
    ``step_s``."""

    def __init__(self, token_ids: list[int], vocab_size: int, eos_token_ids: list[int], step_s: float = 0.0,
                 max_model_len: int = 1 << 20) -> None:
        if not token_ids:
            raise ValueError("the passage encodes to no tokens")
        self.token_ids = token_ids
        self.step_s = step_s
        self.info = scheduler_pb2.EngineInfo(
            ready=True, architecture="SyntheticForCausalLM", max_model_len=max_model_len, vocab_size=vocab_size,
            block_size=16, num_blocks=1 << 20, dtype="none", eos_token_ids=eos_token_ids, world_size=1,
        )
        self._offsets = itertools.count(0, 7919)  # each request starts elsewhere in the passage
        self._streams: dict[int, tuple[dict[str, _Running], asyncio.Queue]] = {}
        self._next_stream = itertools.count()
        self._work = asyncio.Event()  # set when a request arrives
        self.num_steps = 0
        self.num_outputs = 0

    async def GetEngineInfo(self, request, context):
        return self.info

    async def Connect(self, request_iterator, context):
        stream_id = next(self._next_stream)
        running: dict[str, _Running] = {}
        events: asyncio.Queue = asyncio.Queue(maxsize=1)
        self._streams[stream_id] = (running, events)

        async def read() -> None:
            async for msg in request_iterator:
                if msg.WhichOneof("kind") == "submit":
                    sub = msg.submit
                    running[sub.request_id] = _Running(
                        sub.request_id, next(self._offsets) % len(self.token_ids),
                        sub.sampling_params.max_tokens, len(sub.prompt_token_ids))
                    self._work.set()
                else:
                    running.pop(msg.abort.request_id, None)
            running.clear()  # the gateway closed the stream: the engine steps it no more
            await events.put(None)

        reader = asyncio.create_task(read())
        try:
            while (event := await events.get()) is not None:
                await context.write(event)
        finally:
            del self._streams[stream_id]
            reader.cancel()
            while not events.empty():  # frees the engine loop if it waits to hand this stream an event
                events.get_nowait()

    async def run(self) -> None:
        """The engine loop: a step for every stream with running requests, then the next."""
        step_id = 0
        next_step = time.perf_counter()
        while True:
            busy = [(running, events) for running, events in self._streams.values() if running]
            if not busy:
                self._work.clear()
                await self._work.wait()
                next_step = time.perf_counter()
                continue
            for running, events in busy:
                event = self._step(step_id, running)
                self.num_outputs += len(event.outputs)
                await events.put(event)  # waits while this stream's last event is not yet taken
            step_id += 1
            self.num_steps += 1
            if self.step_s:
                next_step += self.step_s
                await asyncio.sleep(max(0.0, next_step - time.perf_counter()))
            else:
                await asyncio.sleep(0)  # let the readers and writers run

    def _step(self, step_id: int, running: dict[str, _Running]) -> scheduler_pb2.SchedulerEvent:
        event = scheduler_pb2.SchedulerEvent(step_id=step_id)
        ids, n = self.token_ids, len(self.token_ids)
        done = []
        for r in running.values():
            out = event.outputs.add(request_id=r.request_id, token_ids=[ids[r.position]],
                                    num_prompt_tokens=r.num_prompt_tokens)
            r.position = (r.position + 1) % n
            r.remaining -= 1
            if r.remaining <= 0:
                out.finish_reason = scheduler_pb2.FINISH_REASON_LENGTH
                done.append(r.request_id)
        for request_id in done:
            del running[request_id]
        return event


async def serve(args: argparse.Namespace) -> int:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(f"{args.model}/tokenizer.json")
    specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    eos = [tok.token_to_id(t) for t in ("</s>", "<|endoftext|>", "<|im_end|>", "<eos>") if t in specials]
    token_ids = [i for i in tok.encode(passage()).ids if i not in eos]
    servicer = SyntheticScheduler(token_ids, tok.get_vocab_size(), eos, args.step_ms / 1e3)
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 * 2**20)])
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(servicer, server)
    server.add_insecure_port(args.listen)
    await server.start()
    engine = asyncio.create_task(servicer.run())
    print(f"synthetic engine: listening on {args.listen} ({len(token_ids)} passage tokens)", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    engine.cancel()
    print(f"synthetic engine: {servicer.num_steps} steps, {servicer.num_outputs} outputs", flush=True)
    await server.stop(grace=0.5)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scheduler_svc.bench.synthetic_engine",
                                description="A SchedulerService that emits tokens without a model (bench gateway).")
    p.add_argument("--model", required=True, help="directory holding the tokenizer.json the gateways use")
    p.add_argument("--listen", required=True, help="gRPC address to serve on (host:port or unix:PATH)")
    p.add_argument("--step-ms", type=float, default=0.0, help="least time per step (default 0: as fast as taken)")
    lifetime.add_argument(p)
    args = p.parse_args(argv)
    if args.exit_with_parent:
        lifetime.exit_with_parent()
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
