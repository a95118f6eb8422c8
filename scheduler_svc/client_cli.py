"""``pagedserve generate``: one completion from a running gateway, streamed; and the flags that every
client command (generate, chat) shares: the target, TLS and the bearer token. The sampling flags are
sampling_flags' (the same for offline, generate and chat); the server checks every value itself."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from scheduler_svc.command import INTERRUPTED, Command
from scheduler_svc.sampling_flags import add_sampling_flags, sampling_kwargs, uint


def add_connection_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="localhost:50051", help="gateway address (default localhost:50051)")
    p.add_argument("--timeout", type=float, default=None, help="deadline of each call in seconds")
    tls = p.add_argument_group("gateway security")
    tls.add_argument("--tls", action="store_true", help="speak TLS (server certificate checked against the system's "
                     "roots, or --tls-ca)")
    tls.add_argument("--tls-ca", metavar="PEM", help="trust this CA for the server's certificate (implies --tls)")
    tls.add_argument("--tls-cert", metavar="PEM", help="client certificate for mutual TLS (with --tls-key)")
    tls.add_argument("--tls-key", metavar="PEM", help="the client certificate's private key")
    tls.add_argument("--token-file", metavar="FILE", help="send 'authorization: Bearer TOKEN', TOKEN being the "
                     "file's content")


class CtrlC:
    """Ctrl-C while a stream is read: the SIGINT handler only notes it and cancels the call from another
    thread, and the stream then ends as cancelled. A KeyboardInterrupt raised wherever the main thread
    happens to be can land inside grpc's own code, where it can stall the stream with the call's lock
    held or be lost (both seen on a loaded machine). Outside the ``with``, SIGINT is as before."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.pressed = False
        self._previous = None

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, signum, frame) -> None:
        self.pressed = True
        threading.Thread(target=self.stream.cancel, name="ctrl-c", daemon=True).start()

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def client_kwargs(args) -> dict:
    """Client(...)'s TLS and token keywords from add_connection_arguments' flags."""
    kwargs = {"tls": args.tls or bool(args.tls_ca or args.tls_cert), "ca_cert": args.tls_ca,
              "client_cert": args.tls_cert, "client_key": args.tls_key}
    if args.token_file:
        kwargs["token"] = Path(args.token_file).read_text().strip()
    for name in ("ca_cert", "client_cert", "client_key"):
        if kwargs[name] is not None:
            kwargs[name] = Path(kwargs[name]).read_bytes()
    return kwargs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help="prompt text (with --chat: the user's message)")
    add_sampling_flags(p)
    p.add_argument("--logprobs", type=uint(32), default=None, metavar="N",
                   help="return each token's log probability and its N most likely alternatives (0 to 20)")
    p.add_argument("--prompt-logprobs", type=uint(32), default=None, metavar="N",
                   help="return each prompt token's log probability and its N most likely alternatives")
    constraint = p.add_argument_group("output constraint (structured output; at most one)")
    constraint = constraint.add_mutually_exclusive_group()
    constraint.add_argument("--json-schema", metavar="FILE", help="generate JSON that validates against this schema")
    constraint.add_argument("--json-object", action="store_true", help="generate any JSON object")
    constraint.add_argument("--regex", help="generate text matching this regular expression")
    constraint.add_argument("--choice", action="append", default=None, help="generate exactly one of these "
                            "strings (repeatable)")
    constraint.add_argument("--grammar", metavar="FILE", help="generate text of this EBNF (GBNF) grammar (rule root)")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the model's chat template (the Chat RPC)")
    p.add_argument("--system", default=None, help="with --chat: a system message before the prompt")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (token_ids, text, finish_reason, usage, logprobs) at the end instead; "
                   "with several samples one per line, each with its index")
    add_connection_arguments(p)


def run(args) -> int:
    import clients  # noqa: F401  (puts pagedserve.* on sys.path)
    from pagedserve.client import Client, GenerationError, SamplingParams

    params = SamplingParams(
        **sampling_kwargs(args), logprobs=args.logprobs is not None, top_logprobs=args.logprobs or 0,
        prompt_logprobs=args.prompt_logprobs,
        json_schema=Path(args.json_schema).read_text() if args.json_schema else None,
        json_object=args.json_object, regex=args.regex, choice=args.choice,
        grammar=Path(args.grammar).read_text() if args.grammar else None,
    )
    several = (params.n or 1) > 1 or params.beam_width > 1
    chunks = []
    try:
        with Client(args.target, **client_kwargs(args)) as client:
            if args.chat:
                messages = ([("system", args.system)] if args.system is not None else []) + [("user", args.prompt)]
                stream = client.chat(messages, params, timeout=args.timeout)
            else:
                stream = client.generate(args.prompt, params, timeout=args.timeout)
            with CtrlC(stream) as ctrl_c:
                for chunk in stream:
                    chunks.append(chunk)
                    if not (args.json or several):
                        print(chunk.text, end="", flush=True)
            if ctrl_c.pressed:
                raise KeyboardInterrupt
    except (GenerationError, KeyboardInterrupt, OSError) as exc:
        if chunks and not (args.json or several):
            print()
        if isinstance(exc, KeyboardInterrupt):
            print("pagedserve generate: interrupted", file=sys.stderr)
            return INTERRUPTED
        what = f"{exc.code.name}: {exc.message}" if isinstance(exc, GenerationError) else str(exc)
        print(f"pagedserve generate: {what}", file=sys.stderr)
        return 1
    if several:
        _print_samples(chunks, "beam" if params.beam_width > 1 else "sample", args.json)
    else:
        _print_completion(chunks, args.json)
    return 0


def _ending(last) -> dict:
    """finish_reason and usage of a sample's last chunk, as --json prints them."""
    usage = last.usage if last is not None else None
    return {"finish_reason": last.finish_reason if last else None, "usage": None if usage is None else {
        "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
        "cached_prompt_tokens": usage.cached_prompt_tokens,
    }}


def _logprob_row(lp) -> dict:
    return {"token_id": lp.token_id, "text": lp.text, "logprob": lp.logprob, "top": [list(t) for t in lp.top],
            "top_texts": list(lp.top_texts)}


def _print_completion(chunks: list, as_json: bool) -> None:
    """After the streamed text: a newline, and the logprobs when asked (or everything as JSON)."""
    logprobs = [_logprob_row(lp) for c in chunks for lp in c.logprobs]
    prompt_logprobs = [_logprob_row(lp) for c in chunks for lp in c.prompt_logprobs]
    if not as_json:
        print()
        for kind, rows in (("prompt token", prompt_logprobs), ("token", logprobs)):
            for lp in rows:  # each token's text beside its id, quoted (json) so that spaces and newlines show
                top = "  ".join(f"{t} {json.dumps(x, ensure_ascii=False)}:{v:.4f}"
                                for (t, v), x in zip(lp["top"], lp["top_texts"], strict=True))
                print(f"{kind} {lp['token_id']} {json.dumps(lp['text'], ensure_ascii=False)}: {lp['logprob']:.4f}"
                      + (f"  top: {top}" if top else ""))
        return
    out = {"token_ids": [t for c in chunks for t in c.token_ids], "text": "".join(c.text for c in chunks),
           **_ending(chunks[-1] if chunks else None)}
    if logprobs:
        out["logprobs"] = logprobs
    if prompt_logprobs:
        out["prompt_logprobs"] = prompt_logprobs  # prompt tokens from the second on
    print(json.dumps(out, ensure_ascii=False))


def _print_samples(chunks: list, kind: str, as_json: bool) -> None:
    """Several samples (or beams), each whole: a header line and its text, or one JSON line each."""
    from pagedserve.client import collect

    for c in collect(chunks):
        if as_json:
            print(json.dumps(dict({"index": c.index, "token_ids": c.token_ids, "text": c.text},
                                  **_ending(c)), ensure_ascii=False))
        else:
            print(f"--- {kind} {c.index} ({c.finish_reason}, {len(c.token_ids)} tokens) ---")
            print(c.text)


COMMAND = Command("generate", "stream one completion from a running gateway",
                  "Stream one completion from a pagedserve gateway and print the text as it arrives (several "
                  "samples or beams print whole, each under a header).", add_arguments, run)
