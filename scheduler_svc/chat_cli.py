"""``pagedserve chat``: an interactive terminal chat with a served model, its replies streamed.

The conversation lives here: every turn sends the whole history to the gateway's Chat RPC, which
renders the model's chat template. Ctrl-C while a reply streams stops that reply (the call is
cancelled, so the server frees its blocks at once) and keeps what was shown of it; Ctrl-C or Ctrl-D
at the prompt ends the chat with status 0. Errors print one line; the chat goes on after a refused
turn (for instance a conversation grown past the context length) and ends, with status 1, when
the server cannot chat at all (no chat template, unreachable).
"""

from __future__ import annotations

import argparse
import sys

from scheduler_svc.client_cli import CtrlC, add_connection_arguments, client_kwargs
from scheduler_svc.command import Command
from scheduler_svc.sampling_flags import add_sampling_flags, sampling_kwargs

PROMPT = "> "


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", default=None, help="system message that opens the conversation")
    add_sampling_flags(p, max_tokens=512, several=False)  # one reply a turn: no --n, no beams
    add_connection_arguments(p)


def run(args: argparse.Namespace) -> int:
    import grpc

    import clients  # noqa: F401  (puts pagedserve.* on sys.path)
    from pagedserve.client import Client, GenerationError, SamplingParams

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    params = SamplingParams(**sampling_kwargs(args))
    history: list[tuple[str, str]] = [("system", args.system)] if args.system else []
    fatal = {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED}
    with Client(args.target, **client_kwargs(args)) as client:
        while True:
            try:
                line = input(PROMPT)
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if not line.strip():
                continue
            history.append(("user", line))
            try:
                history.append(("assistant", _stream_reply(client.chat(history, params, timeout=args.timeout))))
            except GenerationError as exc:
                history.pop()  # the turn was refused: the conversation stays as it was
                print(f"pagedserve chat: {exc.code.name}: {exc.message}", file=sys.stderr, flush=True)
                if exc.code in fatal:
                    return 1


def _stream_reply(stream) -> str:
    """Prints the reply as it streams and returns it; Ctrl-C cancels the call and keeps what was shown."""
    parts: list[str] = []
    with CtrlC(stream) as ctrl_c:  # Ctrl-C cancels the call; the stream then ends
        for chunk in stream:
            print(chunk.text, end="", flush=True)
            parts.append(chunk.text)
    if ctrl_c.pressed:
        print(" [stopped]", end="")
    print(flush=True)
    return "".join(parts)


COMMAND = Command("chat", "chat with a served model in the terminal (replies stream)",
                  "Chat with the model a gateway serves: type a message, the reply streams back; the "
                  "conversation is kept and sent whole each turn (the gateway applies the model's chat template). "
                  "Ctrl-C during a reply stops it; Ctrl-C or Ctrl-D at the prompt exits.", add_arguments, run)
