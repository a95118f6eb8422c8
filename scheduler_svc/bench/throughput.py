"""``pagedserve bench throughput``: offline output tokens per second, beside transformers measured in
the same run and the roofline from ceilings measured at the start of the run."""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from gpu_worker.engine_args import EngineArgs
from scheduler_svc.command import Command

# Random-weight shapes (Llama architecture, bf16, untied head), as in docs/DESIGN.md.
SHAPES: dict[str, dict] = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0),
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=1000000.0),
}
# name: (shape, prompts, input length, output length, HF static batch size)
WORKLOADS: dict[str, tuple[str, int, str, str, int]] = {
    "W8B": ("llama3-8b", 256, "512", "256", 64),
    "W06": ("qwen3-0.6b", 512, "256", "256", 128),
    "WU": ("qwen3-0.6b", 256, "100-1024", "100-1024", 64),
}


def parse_lengths(spec: str, n: int, rng: random.Random) -> list[int]:
    """'512' -> all 512; 'A-B' -> uniform integers in [A, B] drawn from rng."""
    if "-" in spec:
        lo, hi = (int(x) for x in spec.split("-", 1))
        if not 1 <= lo <= hi:
            raise argparse.ArgumentTypeError(f"bad length range {spec!r}")
        return [rng.randint(lo, hi) for _ in range(n)]
    return [int(spec)] * n


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)

    @property
    def num_total_tokens(self) -> int:
        return self.num_output_tokens + sum(len(p) for p in self.prompts)


def make_workload(num_prompts: int, input_len: str, output_len: str, vocab: int, seed: int = 0) -> Workload:
    rng = random.Random(seed)
    in_lens = parse_lengths(input_len, num_prompts, rng)
    out_lens = parse_lengths(output_len, num_prompts, rng)
    prompts = [[rng.randrange(10, vocab) for _ in range(n)] for n in in_lens]
    return Workload(prompts, out_lens)


def write_shape_config(shape: str, out_dir: Path, max_len: int) -> Path:
    """A config.json-only model directory for ``--load-format dummy``."""
    cfg = dict(SHAPES[shape], architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-5,
               tie_word_embeddings=False, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2,
               max_position_embeddings=-(-max_len // 256) * 256, hidden_act="silu")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=1))
    return out_dir


# ---- roofline


def roofline_seconds(cfg: dict, work: Workload, ceilings: dict[str, float], dtype_bytes: int = 2,
                     weight_bytes: int | None = None, kv_bytes: int | None = None) -> float:
    """Least time any engine needs on this device: prefill at the matmul rate, then each decode step at
    max(bytes / bandwidth, flops / matmul rate), reading all weights and every live sequence's KV.
    ``ceilings`` as kernels.bench.ceilings.measure_ceilings gives them (GB/s, TFLOP/s). The bytes are
    those actually read: ``weight_bytes`` per linear-layer weight (1 for fp8 weights; the LM head stays
    at ``dtype_bytes``) and ``kv_bytes`` per KV element (1 for an fp8 cache), both ``dtype_bytes`` by
    default; fp8 weights run their products at twice the measured (bf16) matmul rate."""
    weight_bytes = dtype_bytes if weight_bytes is None else weight_bytes
    kv_bytes = dtype_bytes if kv_bytes is None else kv_bytes
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv_heads, hd, vocab = (cfg["num_attention_heads"], cfg["num_key_value_heads"],
                                  cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
                                  cfg["vocab_size"])
    layer_params = h * hd * (2 * heads + 2 * kv_heads) + 3 * h * inter
    params = layers * layer_params
    kv_per_token = 2 * layers * kv_heads * hd * kv_bytes
    bw, peak = ceilings["copy_gbps"] * 1e9, ceilings["matmul_tflops"] * 1e12  # bytes/s, FLOP/s
    if weight_bytes < dtype_bytes:
        peak *= dtype_bytes / weight_bytes
    prefill_flops = 0.0
    for p in work.prompts:
        n = len(p)
        prefill_flops += 2 * params * n + 2 * h * vocab  # linears on every token, LM head on the last
        prefill_flops += 4 * layers * heads * hd * n * (n + 1) / 2  # causal QK^T and PV
    seconds = prefill_flops / peak
    in_lens = [len(p) for p in work.prompts]
    for step in range(1, max(work.output_lens)):  # the first output token comes from the prefill
        live = [i for i, n in enumerate(work.output_lens) if n > step]
        ctx = sum(in_lens[i] + step for i in live)
        bytes_ = params * weight_bytes + h * vocab * dtype_bytes + ctx * kv_per_token
        flops = 2 * (params + h * vocab) * len(live) + 4 * layers * heads * hd * ctx
        seconds += max(bytes_ / bw, flops / peak)
    return seconds


# ---- systems under test


@dataclass
class Result:
    system: str
    seconds: float
    output_tokens: int
    total_tokens: int
    profile: dict | None = None

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_tok_s(self) -> float:
        return self.total_tokens / self.seconds


def run_ours(engine: EngineArgs, work: Workload, warm: Workload) -> Result:
    """``work`` through the offline engine, after ``warm``: other prompts of the same lengths (no
    prefix-cache hits later), which compile the kernel variants that this workload's prefill and mixed
    steps use before the clock starts."""
    from tqdm import tqdm

    from gpu_worker.sampling_params import SamplingParams
    from scheduler_svc.llm import LLM

    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in work.output_lens]
    with LLM(engine) as llm:
        # The pool's capacity: an fp8 cache (--kv-cache-dtype fp8) holds twice the tokens of bf16's.
        kv_tokens = llm.info.num_blocks * llm.info.block_size
        longest = max(len(p) + n for p, n in zip(work.prompts, work.output_lens, strict=True))
        print(f"KV pool: {llm.info.num_blocks} blocks = {kv_tokens} tokens = {kv_tokens // longest} sequences of "
              f"{longest} tokens", flush=True)
        llm.generate(warm.prompts, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        with tqdm(total=len(work.prompts), desc="pagedserve", unit="req", disable=None) as bar:
            t0 = time.perf_counter()
            before = llm.stats()
            results = llm.generate(work.prompts, params, on_finish=lambda _: bar.update())
            seconds = time.perf_counter() - t0
            profile = step_profile(before, llm.stats())
            profile["kv_blocks"], profile["kv_tokens"] = llm.info.num_blocks, kv_tokens
    produced = sum(len(r.outputs[0].token_ids) for r in results)
    if produced != work.num_output_tokens:
        raise RuntimeError(f"pagedserve produced {produced} tokens, expected {work.num_output_tokens}")
    print("step profile: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in profile.items()), flush=True)
    return Result("pagedserve", seconds, produced, work.num_total_tokens, profile)


def step_profile(before, after) -> dict:
    """Where the engine's time went between two EngineStats snapshots (milliseconds)."""
    d = {f: getattr(after, f) - getattr(before, f) for f in (
        "num_steps", "num_decode_steps", "step_wall_ns", "decode_step_wall_ns", "worker_total_ns",
        "worker_forward_ns", "worker_sample_ns", "worker_prepare_ns", "num_ahead_steps")}
    ms = 1e-6
    steps = max(d["num_steps"], 1)
    return {
        "steps": d["num_steps"],
        "decode_steps": d["num_decode_steps"],
        "ahead_steps": d["num_ahead_steps"],
        "step_wall_ms_total": d["step_wall_ns"] * ms,
        "decode_step_wall_ms_mean": d["decode_step_wall_ns"] * ms / max(d["num_decode_steps"], 1),
        "worker_ms_mean": d["worker_total_ns"] * ms / steps,
        "worker_prepare_ms_mean": d["worker_prepare_ns"] * ms / steps,
        "worker_forward_launch_ms_mean": d["worker_forward_ns"] * ms / steps,
        "worker_sample_and_device_wait_ms_mean": d["worker_sample_ns"] * ms / steps,
        # With steps planned ahead the scheduler's work overlaps the workers' and this shrinks toward 0.
        "scheduler_and_transport_ms_mean": (d["step_wall_ns"] - d["worker_total_ns"]) * ms / steps,
    }


def _hf_model(model_dir: Path, device: str, load_format: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from gpu_worker.model_files import resolve_model

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if load_format == "dummy":
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    elif (gguf_file := resolve_model(model_dir).gguf_file) is not None:  # dequantized by transformers
        model = AutoModelForCausalLM.from_pretrained(gguf_file.resolve().parent, gguf_file=gguf_file.resolve().name,
                                                     dtype=dtype, attn_implementation="sdpa")
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval()


def run_hf_static(model_dir: Path, work: Workload, args) -> Result:
    """transformers generate() in static batches (left padding); a batch runs to its longest output, and
    only requested tokens count as output."""
    import torch
    from tqdm import tqdm

    model = _hf_model(model_dir, args.device, args.load_format)
    bsz = args.hf_batch_size
    with torch.inference_mode(), tqdm(total=len(work.prompts), desc="hf-static", unit="req", disable=None) as bar:
        t0 = time.perf_counter()
        for start in range(0, len(work.prompts), bsz):
            chunk = work.prompts[start : start + bsz]
            out_len = max(work.output_lens[start : start + bsz])
            width = max(len(p) for p in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(chunk):
                ids[i, width - len(p) :] = torch.tensor(p)
                mask[i, width - len(p) :] = 1
            model.generate(ids.to(args.device), attention_mask=mask.to(args.device), max_new_tokens=out_len,
                           min_new_tokens=out_len, do_sample=False, pad_token_id=0)
            bar.update(len(chunk))
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    del model
    _free(args.device)
    return Result("hf-static", seconds, work.num_output_tokens, work.num_total_tokens)


def run_hf_cb(model_dir: Path, work: Workload, args) -> Result:
    """transformers' continuous batching manager, each request with its own output length, EOS off."""
    from transformers import GenerationConfig

    model = _hf_model(model_dir, args.device, args.load_format)
    gen = GenerationConfig(max_new_tokens=max(work.output_lens), do_sample=False, eos_token_id=-1)
    done = 0
    produced = 0
    # No inference_mode here: the manager's own thread updates tensors made in this one.
    with model.continuous_batching_context_manager(generation_config=gen, block=True, timeout=5) as manager:
        t0 = time.perf_counter()
        for i, (p, n) in enumerate(zip(work.prompts, work.output_lens, strict=True)):
            manager.add_request(p, request_id=f"r{i}", max_new_tokens=n, eos_token_id=-1)
        while done < len(work.prompts):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                done += 1
                produced += len(result.generated_tokens)
            elif result is None and not manager.is_running():
                raise RuntimeError("transformers' continuous batching stopped early")
        seconds = time.perf_counter() - t0
    del model
    _free(args.device)
    if produced != work.num_output_tokens:
        raise RuntimeError(f"hf-cb produced {produced} tokens, expected {work.num_output_tokens}")
    return Result("hf-cb", seconds, produced, work.num_total_tokens)


def _hf_subset(work: Workload, num_prompts: int | None) -> Workload:
    """The first ``num_prompts`` requests of ``work`` (all of it when None or larger). The workloads'
    lengths are drawn independently per request, so the first ones are a fair sample; hf-static runs
    them in the same batches as it would the whole workload."""
    if num_prompts is None or num_prompts >= len(work.prompts):
        return work
    return Workload(work.prompts[:num_prompts], work.output_lens[:num_prompts])


def _free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def resolve_workload(args, with_shape: bool = True) -> None:
    """Fills --num-prompts, --input-len and --output-len (and, ``with_shape``, the model shape; the hf
    batch size where the command has one) from --workload."""
    if args.workload:
        shape, n, in_len, out_len, hf_bs = WORKLOADS[args.workload]
        if with_shape:
            args.shape = args.shape or shape
        args.num_prompts = args.num_prompts or n
        args.input_len, args.output_len = args.input_len or in_len, args.output_len or out_len
        if hasattr(args, "hf_batch_size"):
            args.hf_batch_size = args.hf_batch_size or hf_bs
    if not (args.num_prompts and args.input_len and args.output_len):
        raise SystemExit("give --workload or all of --num-prompts, --input-len, --output-len")


def _kernel_profile_out(args, tmp: str) -> Path | None:
    """With --profile-steps: where the worker processes append their kernel profiles (told by env)."""
    if not args.profile_steps:
        return None
    from gpu_worker import step_profile as kernel_profile  # not this module's step_profile()

    if not args.device.startswith("cuda"):
        raise SystemExit("--profile-steps profiles CUDA kernels: it needs --device cuda")
    try:
        kernel_profile.parse_windows(args.profile_steps)
    except ValueError as e:
        raise SystemExit(f"--profile-steps: {e}") from None
    profile_out = Path(tmp) / "profile.jsonl"
    os.environ[kernel_profile.ENV_STEPS] = args.profile_steps  # read by the worker processes
    os.environ[kernel_profile.ENV_OUT] = str(profile_out)
    return profile_out


def _kernel_profiles(profile_out: Path | None) -> list[dict]:
    if profile_out is None:
        return []
    from gpu_worker import step_profile as kernel_profile

    profiles = [json.loads(line) for line in profile_out.read_text().splitlines()] if profile_out.exists() else []
    for prof in profiles:
        print(kernel_profile.format_summary(prof), flush=True)
    if not profiles:
        print("--profile-steps: no window was reached (count the warm-up steps too)", flush=True)
    return profiles


def run(args) -> int:
    from kernels.bench.ceilings import measure_ceilings

    resolve_workload(args)
    args.hf_batch_size = args.hf_batch_size or 64
    with tempfile.TemporaryDirectory(prefix="pagedserve-bench-") as tmp:
        from gpu_worker.model_config import hf_config

        profile_out = _kernel_profile_out(args, tmp)
        if args.model:
            model_dir, args.load_format = Path(args.model), "auto"
        elif args.shape:
            model_dir, args.load_format = Path(tmp) / args.shape, "dummy"
        else:
            raise SystemExit("give --shape or --model")
        if not args.model:
            vocab = SHAPES[args.shape]["vocab_size"]
        else:
            cfg = hf_config(model_dir)
            vocab = cfg["vocab_size"]
        work = make_workload(args.num_prompts, args.input_len, args.output_len, vocab, args.seed)
        warm = make_workload(args.num_prompts, args.input_len, args.output_len, vocab, args.seed + 1)
        if not args.model:
            longest = max(len(p) + n for p, n in zip(work.prompts, work.output_lens, strict=True))
            write_shape_config(args.shape, model_dir, longest)
            cfg = hf_config(model_dir)
        try:
            # On CPU a larger pool than a CPU worker's default, so that the whole workload can run at once.
            cpu_pool = 2**30 if args.device == "cpu" and args.kv_cache_memory is None else args.kv_cache_memory
            engine = EngineArgs.from_args(args, "bench-throughput", model=str(model_dir), load_format=args.load_format,
                                          max_num_seqs=args.max_num_seqs or min(args.num_prompts, 1024),
                                          kv_cache_memory=cpu_pool)
        except ValueError as exc:
            raise SystemExit(f"pagedserve bench throughput: {exc}") from None
        print(f"workload: {len(work.prompts)} prompts, {work.num_output_tokens} output tokens, "
              f"model {args.shape or args.model} on {args.device}, weights {engine.quantization}, "
              f"KV cache {engine.kv_cache_dtype}", flush=True)
        ceilings = measure_ceilings(args.device)
        print(f"measured ceilings: copy {ceilings['copy_gbps'] / 1e3:.2f} TB/s, "
              f"matmul {ceilings['matmul_tflops']:.1f} TFLOP/s", flush=True)
        dtype_bytes = 2 if args.device.startswith("cuda") else 4
        roof_s = roofline_seconds(cfg, work, ceilings, dtype_bytes,
                                  weight_bytes=1 if engine.quantization == "fp8" else dtype_bytes,
                                  kv_bytes=1 if engine.kv_cache_dtype.startswith("fp8") else dtype_bytes)
        roof_s /= engine.tensor_parallel_size  # N devices: N times the bandwidth and FLOPs (all-reduces not counted)
        if args.json_schema:  # constrained decoding's cost instead (bench/constrained.py)
            from scheduler_svc.bench.constrained import run_constrained, write

            write(args.out, run_constrained(engine, work, warm, args.json_schema, engine.max_num_seqs))
            return 0
        results = [run_ours(engine, work, warm)]
        profiles = _kernel_profiles(profile_out)
        runners = {"hf-static": run_hf_static, "hf-cb": run_hf_cb}
        hf_work = _hf_subset(work, args.hf_num_prompts)
        for name in [c for c in (args.compare or "").split(",") if c]:
            if name not in runners:
                raise SystemExit(f"--compare: unknown system {name!r} (known: {', '.join(runners)})")
            result = runners[name](model_dir, hf_work, args)
            if hf_work is not work:
                result.system += "*"
            results.append(result)
    roof_tok_s = work.num_output_tokens / roof_s
    _print_table(results, roof_tok_s, roof_s)
    if any(r.system.endswith("*") for r in results):
        print(f"* on the first {args.hf_num_prompts} of the {len(work.prompts)} prompts (--hf-num-prompts): a rate "
              "over fewer requests, so that the baseline fits the run's time")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "workload": args.workload, "quantization": engine.quantization, "kv_cache_dtype": engine.kv_cache_dtype,
            "shape": args.shape, "model": args.model, "device": args.device,
            "num_prompts": len(work.prompts), "input_len": args.input_len, "output_len": args.output_len,
            "ceilings": ceilings, "roofline_output_tok_s": roof_tok_s,
            "results": [dict(asdict(r), output_tok_s=r.output_tok_s, total_tok_s=r.total_tok_s) for r in results],
            "kernel_profiles": profiles,
        }, indent=1))
    return 0


def _print_table(results: list[Result], roof_tok_s: float, roof_s: float) -> None:
    ours = results[0]
    print(f"\nroofline: {roof_tok_s:,.0f} output tok/s ({roof_s:.2f} s)")
    print(f"{'system':<12} {'out tok/s':>11} {'total tok/s':>12} {'ours / it':>10} {'% roofline':>11}")
    for r in results:
        ratio = ours.output_tok_s / r.output_tok_s
        print(f"{r.system:<12} {r.output_tok_s:>11,.0f} {r.total_tok_s:>12,.0f} {ratio:>9.2f}x "
              f"{100 * r.output_tok_s / roof_tok_s:>10.1f}%")


# The engine settings of benchmark runs where they differ from serving's: larger steps, a GPU.
BENCH_DEFAULTS = {"device": "cuda", "max_num_batched_tokens": 8192}


def add_workload_args(p) -> None:
    """The model and workload flags that `bench throughput` and `bench serving` share."""
    p.add_argument("--shape", choices=sorted(SHAPES), help="random-weight model of this shape")
    p.add_argument("--model", help="checkpoint directory instead of --shape")
    p.add_argument("--workload", choices=sorted(WORKLOADS), help="preset: shape, prompts and lengths")
    p.add_argument("--num-prompts", type=int)
    p.add_argument("--input-len", help="tokens per prompt, N or A-B (uniform, seeded)")
    p.add_argument("--output-len", help="tokens generated per prompt, N or A-B (uniform, seeded)")
    p.add_argument("--seed", type=int, default=0, help="seed of prompts and lengths (default 0)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_workload_args(p)
    p.add_argument("--compare", default="", help="comma-separated: hf-static, hf-cb")
    p.add_argument("--hf-batch-size", type=int, help="batch size of hf-static (default from the workload or 64)")
    p.add_argument("--hf-num-prompts", type=int, default=None,
                   help="run the transformers baselines on the first N prompts only, e.g. one hf-static batch for WU "
                   "whose whole run takes minutes; marked * in the table (default: all)")
    EngineArgs.add_args(p.add_argument_group("engine"), "bench-throughput", **BENCH_DEFAULTS, max_num_seqs=None)
    p.add_argument("--profile-steps", metavar="KIND:SKIP:COUNT[,...]",
                   help="profile the device kernels of these step windows in the worker and print where the "
                   "time goes, e.g. decode:100:10,prefill:20:2 (KIND decode or prefill; steps counted from "
                   "the worker's start, warm-up included). Perturbs the run's throughput.")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--json-schema", metavar="FILE", help="measure constrained decoding instead: the workload "
                   "unconstrained and with every request under this JSON schema (greedy, EOS honoured), then the "
                   "per-step mask cost at --max-num-seqs (bench/constrained.py)")


COMMAND = Command("throughput", "offline throughput beside transformers and the roofline",
                  "Offline throughput (output tokens/s) of pagedserve, optionally beside transformers generate "
                  "(static batches) and its continuous batching, on the same prompts in the same run; the roofline "
                  "comes from ceilings measured at the start. --max-num-seqs defaults to the number of prompts (at "
                  "most 1024).", add_arguments, run)
