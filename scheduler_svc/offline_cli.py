"""``pagedserve offline``: completions of prompts from a local engine (its scheduler and worker
processes started here), printed when all are done. The engine settings are EngineArgs' flags, the
sampling flags sampling_flags' (the same as generate's and chat's)."""

from __future__ import annotations

import argparse
import json
import sys

from gpu_worker.engine_args import EngineArgs, check_device_present
from gpu_worker.model_files import resolve_model
from scheduler_svc.command import INTERRUPTED, Command
from scheduler_svc.sampling_flags import add_sampling_flags, sampling_kwargs


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeat for several prompts)")
    src.add_argument("--prompt-ids", metavar="FILE.json",
                     help="JSON file holding a list of prompts, each a list of token ids")
    add_sampling_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    EngineArgs.add_args(p.add_argument_group("engine"), "offline")


def run(args: argparse.Namespace) -> int:
    from gpu_worker.sampling_params import SamplingParams
    from scheduler_svc.llm import LLM

    if args.prompt_ids:
        with open(args.prompt_ids) as f:
            prompts = json.load(f)
        if not isinstance(prompts, list) or not all(isinstance(p, list) for p in prompts):
            raise SystemExit(f"{args.prompt_ids}: expected a JSON list of token-id lists")
    else:
        prompts = args.prompt
    try:  # every start-up mistake in one line before any process starts (the LLM checks again)
        engine = EngineArgs.from_args(args, "offline")
        resolve_model(engine.model)
        check_device_present(engine.device, engine.tensor_parallel_size)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"pagedserve offline: {exc}") from None
    try:
        params = SamplingParams(**sampling_kwargs(args))
    except ValueError as exc:  # InvalidField names the setting: --n, --beam-width, ...
        print(f"pagedserve offline: error: {exc}", file=sys.stderr)
        return 2
    print(f"starting engine on {args.model} ({args.device})...", file=sys.stderr, flush=True)
    try:
        with LLM(engine) as llm:
            results = llm.generate(prompts, params)
    except KeyboardInterrupt:
        print("pagedserve offline: interrupted", file=sys.stderr)
        return INTERRUPTED
    except (ValueError, RuntimeError, TimeoutError) as exc:  # a prompt refused, the engine failed to start
        print(f"pagedserve offline: {exc}", file=sys.stderr)
        return 1
    for r in results:
        if args.json:
            print(json.dumps({"index": r.index, "outputs": [
                {"token_ids": o.token_ids, "text": o.text, "finish_reason": o.finish_reason}
                for o in r.outputs
            ]}, ensure_ascii=False))
        else:
            for o in r.outputs:
                tag = f"[{r.index}]" if len(r.outputs) == 1 else f"[{r.index}.{o.index}]"
                print(f"{tag} ({o.finish_reason}) {o.text}")
    return 0


COMMAND = Command("offline", "generate completions offline (scheduler + worker processes)",
                  "Generate completions for prompts with a local engine and print them.", add_arguments, run)
