"""`pagedserve serve --kv-events-endpoint` end to end: a subscriber on the scheduler process's PUB socket
receives a completion's prompt blocks as BlockStored, with the prefix cache's hashes (cut to 64 bits),
the prompt's token ids, the parent chain and the topic and sequence numbers as vLLM sends them."""

import pytest

msgpack = pytest.importorskip("msgpack")
zmq = pytest.importorskip("zmq")

import clients  # noqa: E402, F401

# isort: split
from pagedserve.client import Client, SamplingParams  # noqa: E402
from scheduler_svc.bench.local_service import LocalService  # noqa: E402
from scheduler_svc.block_hash import prefix_hashes  # noqa: E402
from scheduler_svc.kv_events_publisher import external_hash  # noqa: E402
from tests.factories import make_checkpoint  # noqa: E402

pytestmark = pytest.mark.slow

BLOCK_SIZE = 16
TOPIC = "kv@127.0.0.1@tiny"


def test_a_subscriber_receives_the_prompts_blocks(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "llama")
    endpoint = f"ipc://{tmp_path}/kv-events"
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt_string(zmq.SUBSCRIBE, "kv@")
    sub.connect(endpoint)  # before the scheduler binds: ZeroMQ connects once it does
    svc = LocalService(checkpoint, "--kv-cache-memory", "16MiB", "--gateways", "1", "--block-size", str(BLOCK_SIZE),
                       "--kv-events-endpoint", endpoint, "--kv-events-topic", TOPIC, log_dir=tmp_path / "logs",
                       start_timeout_s=180)
    try:
        prompt = [(7 * i) % 200 + 3 for i in range(3 * BLOCK_SIZE + 5)]  # three full blocks and 5 tokens
        with Client(svc.target) as client:
            client.wait_ready(180)
            # complete, not generate: a stream nobody reads is cancelled when the channel closes, and
            # then whether the prefill ran first is a race (CI lost it once)
            [done] = client.complete(prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
            assert len(done.token_ids) == 2
        stored, seqs = [], []
        while sub.poll(5000):
            topic, seq, payload = sub.recv_multipart()
            assert topic.decode() == TOPIC
            seqs.append(int.from_bytes(seq, "big"))
            ts, events, rank = msgpack.unpackb(payload)
            assert isinstance(ts, float) and rank == 0
            stored += [e for e in events if e[0] == "BlockStored"]
            if sum(len(e[1]) for e in stored) >= 3:
                break
    finally:
        assert svc.stop() == 0, "\n".join(svc.lines)
        sub.close()
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    hashes = [h for e in stored for h in e[1]]
    assert hashes == [external_hash(h) for h in prefix_hashes(prompt, BLOCK_SIZE, 3)]
    assert [t for e in stored for t in e[3]] == prompt[: 3 * BLOCK_SIZE]
    assert stored[0][2] is None and all(e[4] == BLOCK_SIZE and e[6] == "GPU" for e in stored)
