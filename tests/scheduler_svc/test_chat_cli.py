"""`pagedserve chat` as a process against an in-process gateway (the scripted fake scheduler): Ctrl-C during
a reply stops it (the request is aborted upstream) and the chat goes on with the partial reply in the
history; Ctrl-C at the prompt exits 0 without a traceback; a model without a chat template ends it."""

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest

import clients  # noqa: F401

# isort: split
from pagedserve.v1 import generation_pb2
from scheduler_svc.gateway.chat import CHAT_TEMPLATE_FILE
from scheduler_svc.gateway.tokenizer import Tokenizer
from tests.factories import make_checkpoint
from tests.protos.proto_helpers import REPO
from tests.scheduler_svc.gateway.test_chat import CHATML
from tests.scheduler_svc.gateway.test_server import FakeScheduler as BaseFake
from tests.scheduler_svc.gateway.test_server import running
from tests.waiting import wait_until, wait_until_async

pytestmark = pytest.mark.slow  # the chat runs as a process


class FakeScheduler(BaseFake):
    """test_server's fake (test_openai_http's needs openai) with a context long enough for a conversation of
    10,000-token replies (over-long requests are refused)."""

    async def GetEngineInfo(self, request, context):
        info = await super().GetEngineInfo(request, context)
        info.max_model_len = 65536
        return info


async def prompt_token_ids(chat, messages) -> list[int]:
    """The prompt the gateway sends upstream for a conversation."""
    return list((await chat.request("r", "", messages, generation_pb2.SamplingParams())).token_ids.ids)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "demo")
    (path / CHAT_TEMPLATE_FILE).write_text(CHATML)
    return path


class ChatProcess:
    """`pagedserve chat` with its stdout read as it comes (the prompt has no newline)."""

    def __init__(self, target: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scheduler_svc.cli", "chat", "--target", target, "--max-tokens", "10000"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO)))
        self.out: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while ch := self.proc.stdout.read(1):
            self.out.append(ch)

    @property
    def text(self) -> str:
        return "".join(self.out)

    def wait_for(self, predicate, what: str) -> None:
        wait_until(lambda: predicate(self.text), 60, what=f"{what}; output so far {self.text[-200:]!r}")

    def say(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()


def test_ctrl_c_stops_the_reply_then_exits(model_dir):
    seven = Tokenizer(model_dir).decode([7])
    fake = FakeScheduler(lambda submit: [[7]] * 10_000)
    fake.step_s = 0.002

    def chat(target: str):
        c = ChatProcess(target)
        c.wait_for(lambda t: t == "> ", "the first prompt")
        c.say("hello")
        c.wait_for(lambda t: t.count(seven) >= 3, "a few tokens of the reply")
        c.proc.send_signal(signal.SIGINT)  # stop the reply
        c.wait_for(lambda t: t.endswith(" [stopped]\n> "), "the reply to stop and the next prompt")
        shown = c.text[2 : -len(" [stopped]\n> ")]
        c.say("and?")
        c.wait_for(lambda t: t.count("> ") == 2 and t.endswith(seven), "the second reply")
        c.proc.send_signal(signal.SIGINT)
        c.wait_for(lambda t: t.endswith(" [stopped]\n> "), "the second reply to stop")
        c.proc.send_signal(signal.SIGINT)  # at the prompt: exit
        return c.proc.wait(30), c.proc.stderr.read(), shown

    async def scenario():
        async with running(model_dir, fake) as (_, gateway, target):
            code, stderr, shown = await asyncio.to_thread(chat, target)
            assert (code, stderr) == (0, "")
            # Both replies aborted upstream: the gateway forwards a cancel as it gets to it, which on a busy
            # machine can be after the chat has exited, so wait for that state rather than assert at once.
            await wait_until_async(lambda: len(fake.aborts) == 2, 60, what="both aborts upstream")
            assert len(fake.submits) == 2
            first, second = (list(s.prompt_token_ids) for s in fake.submits)
            history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": shown},
                       {"role": "user", "content": "and?"}]
            assert second == await prompt_token_ids(gateway.chat, history)  # the partial reply is in the history
            assert first == await prompt_token_ids(gateway.chat, history[:1])

    asyncio.run(scenario())


def test_model_without_template_ends_the_chat(model_dir, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(model_dir, plain)
    (plain / CHAT_TEMPLATE_FILE).unlink()

    def chat(target: str):
        return subprocess.run([sys.executable, "-m", "scheduler_svc.cli", "chat", "--target", target],
                              input="hi\n", capture_output=True, text=True, timeout=60, cwd=REPO,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))

    async def scenario():
        async with running(plain, FakeScheduler(lambda s: [[7]])) as (_, _, target):
            proc = await asyncio.to_thread(chat, target)
        assert proc.returncode == 1 and proc.stdout == "> "
        assert proc.stderr.startswith("pagedserve chat: FAILED_PRECONDITION: model 'plain' has no chat template")

    asyncio.run(scenario())
