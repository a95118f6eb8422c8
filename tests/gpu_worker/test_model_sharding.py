"""Tensor parallelism in the worker: how sizes split over ranks (KV heads replicated when fewer than the
ranks, vocabulary tables padded), that the ranks' shards of every checkpoint tensor cover it, the errors
for sizes that do not split; and, over real gloo process groups of 2 and 4 CPU ranks, that every
family's sharded model gives transformers' logits on every rank while each rank holds about 1/N of the
parameter bytes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gpu_worker.distributed import check_tensor_parallel, default_init_method
from gpu_worker.model_config import ModelConfig
from gpu_worker.models import get_model_class
from gpu_worker.models.parallel import ParallelEmbedding, TPGroup
from tests.factories import MODEL_CASES, make_checkpoint

REPO = Path(__file__).resolve().parents[2]
# the vocabulary does not split evenly: the last ranks' tables end in padding rows
CASES = {**MODEL_CASES, "llama_vocab_1001": ("llama", {"vocab_size": 1001})}
# 4 ranks (4 processes on CI's few cores): KV heads replicated (2 over 4 ranks), padded vocabulary and
# position tables (OPT's 1026 rows), tied heads with q/k norms, and the other families
CASES_4 = ("llama", "llama_vocab_1001", "qwen3", "gpt2", "gpt_neox_sequential", "opt_post_ln_projected")


def test_split_and_its_error():
    assert [TPGroup(r, 4).split(8, "x") for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    with pytest.raises(ValueError, match="intermediate_size 10 is not divisible by the tensor-parallel size 4"):
        TPGroup(1, 4).split(10, "intermediate_size")


def test_kv_heads_split_or_replicate():
    assert [TPGroup(r, 2).kv_heads(8) for r in range(2)] == [(0, 4), (4, 8)]
    # 2 KV heads over 4 ranks: ranks 0, 1 read KV head 0 (query heads 0-3 of 8), ranks 2, 3 head 1
    assert [TPGroup(r, 4).kv_heads(2) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [TPGroup(r, 8).kv_heads(1) for r in range(8)] == [(0, 1)] * 8
    with pytest.raises(ValueError, match="neither a divisor nor a multiple of num_key_value_heads 3"):
        TPGroup(0, 4).kv_heads(3)
    with pytest.raises(ValueError, match="num_key_value_heads 3 is not divisible by the tensor-parallel size 2"):
        TPGroup(0, 2).kv_heads(3)
    with pytest.raises(ValueError, match="num_key_value_heads 6 is not divisible"):
        TPGroup(0, 4).kv_heads(6)


def test_rows_pad_the_last_shards():
    assert [TPGroup(r, 2).rows(1001) for r in range(2)] == [(0, 501, 501), (501, 1001, 501)]
    assert [TPGroup(r, 4).rows(5) for r in range(4)] == [(0, 2, 2), (2, 4, 2), (4, 5, 2), (5, 5, 2)]


def test_model_config_for_rank(tmp_path):
    config = ModelConfig.from_dir(make_checkpoint(tmp_path, "llama"))  # 4 heads, 2 KV heads
    half, quarter = config.for_rank(2), config.for_rank(4)
    assert (half.num_heads, half.num_kv_heads, half.tensor_parallel_size) == (2, 1, 2)
    assert (quarter.num_heads, quarter.num_kv_heads) == (1, 1)  # KV heads replicated
    assert half.kv_bytes_per_token(torch.float32) * 2 == config.kv_bytes_per_token(torch.float32)
    assert config.for_rank(1) is config
    with pytest.raises(ValueError, match="num_attention_heads 4 is not divisible by the tensor-parallel size 3"):
        config.for_rank(3)
    with pytest.raises(ValueError, match="already one rank's"):
        half.for_rank(2)


@pytest.mark.parametrize(
    "arch, overrides, world_size, message",
    [
        ("llama", {"intermediate_size": 150}, 4, "intermediate_size 150 is not divisible by the tensor-parallel size"),
        ("gpt2", {}, 3, "num_attention_heads 4 is not divisible by the tensor-parallel size 3"),
        ("opt", {"ffn_dim": 258}, 4, "ffn_dim 258 is not divisible"),
        ("gpt_neox", {"intermediate_size": 250}, 4, "intermediate_size 250 is not divisible"),
        ("gpt2", {"n_inner": 250}, 4, "n_inner 250 is not divisible"),
        ("llama", {"num_key_value_heads": 1, "num_attention_heads": 8, "head_dim": 8}, 8, None),
    ],
)
def test_sizes_that_do_not_split_are_named(tmp_path, arch, overrides, world_size, message):
    config = ModelConfig.from_dir(make_checkpoint(tmp_path, arch, num_hidden_layers=1, **overrides))
    check_tensor_parallel(config, 2)
    if message is None:  # splits: 8 heads over 8 ranks, the one KV head on every rank
        check_tensor_parallel(config, world_size)
        return
    with pytest.raises(ValueError, match=message):
        check_tensor_parallel(config, world_size)


def test_default_init_method():
    assert default_init_method("ipc:///tmp/ps-x/workers.sock") == "file:///tmp/ps-x/torch-dist-init"
    assert default_init_method("tcp://127.0.0.1:5557") == "tcp://127.0.0.1:5558"
    assert default_init_method("tcp://[::1]:5557") == "tcp://[::1]:5558"
    for bad in ("tcp://*:5557", "inproc://x", "tcp://host"):
        with pytest.raises(ValueError, match="--dist-init-method"):
            default_init_method(bad)


def _meta_model(config: ModelConfig, tp: TPGroup):
    with torch.device("meta"):
        return get_model_class(config.hf_config).from_hf_config(config.hf_config, tp)


def _written_rows(model) -> dict[str, torch.Tensor]:
    """Per parameter, how many checkpoint tensors write each of its rows."""
    rows = {name: torch.zeros(p.shape[0], dtype=torch.int32) for name, p in model.named_parameters()}
    for slot in model.checkpoint_slots().values():
        start, stop = slot.rows or (0, len(rows[slot.param]))
        rows[slot.param][start:stop] += 1
    return rows


def _padding(model) -> dict[str, int]:
    """Per row-split table (embeddings and the LM head), the row where its padding starts."""
    tables = {f"{name}.weight": m.stop - m.start
              for name, m in model.named_modules() if isinstance(m, ParallelEmbedding)}
    vocab_start, vocab_stop, _ = model.tp.rows(model.args.vocab_size)
    return tables | {"lm_head.weight": vocab_stop - vocab_start}


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_rank_shards_cover_every_checkpoint_tensor(tmp_path, case, world_size):
    """On each rank every parameter row but the tables' padding is written exactly once; over the ranks,
    the shards of each split checkpoint tensor cover it once (KV heads: at least once when replicated)."""
    arch, overrides = CASES[case]
    config = ModelConfig.from_dir(make_checkpoint(tmp_path, arch, num_hidden_layers=2, **overrides))
    coverage: dict[str, torch.Tensor] = {}
    for rank in range(world_size):
        model = _meta_model(config, TPGroup(rank, world_size))
        padding = _padding(model)
        for name, rows in _written_rows(model).items():
            want = torch.ones_like(rows)
            want[padding.get(name, len(rows)):] = 0
            assert torch.equal(rows, want), f"rank {rank}: {name} rows written {rows.tolist()}"
        for src, slot in model.checkpoint_slots().items():
            if slot.shard is None:
                continue
            covered = coverage.setdefault(src, torch.zeros(slot.shard.size, dtype=torch.int32))
            for start, stop in slot.shard.ranges:
                covered[start:stop] += 1
    assert coverage, "nothing is split"
    replicated_kv = world_size > config.num_kv_heads
    for src, covered in coverage.items():
        if replicated_kv and (".k_proj." in src or ".v_proj." in src):
            assert torch.all(covered == world_size // config.num_kv_heads), src
        else:
            assert torch.all(covered == 1), f"{src}: read {covered.unique().tolist()} times"


def _hf_logits(model_dir, sequences: dict[int, list[int]]) -> dict[int, torch.Tensor]:
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return {s: hf.eval()(torch.tensor([ids])).logits[0] for s, ids in sequences.items()}


def _run_ranks(world_size: int, dirs: dict[str, Path], out: Path) -> dict[str, list[dict]]:
    """Starts the ranks (tests/gpu_worker/tp_ranks.py), one process each; returns per case each rank's record."""
    specs = [f"{case}={path}" for case, path in dirs.items()]
    init = f"file://{out}/torch-dist-init"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-m", "tests.gpu_worker.tp_ranks", str(rank), str(world_size), init,
                               str(out), *specs], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
             for rank in range(world_size)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(errors)
    return {case: [torch.load(out / f"{case}.rank{r}.pt") for r in range(world_size)] for case in dirs}


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_models_match_transformers(tmp_path, world_size):
    cases = CASES if world_size == 2 else {case: CASES[case] for case in CASES_4}
    dirs = {case: make_checkpoint(tmp_path / case, arch, **overrides) for case, (arch, overrides) in cases.items()}
    out = tmp_path / "out"
    out.mkdir()
    records = _run_ranks(world_size, dirs, out)
    for case, ranks in records.items():
        reference = _hf_logits(dirs[case], ranks[0]["computed"])
        for s, expected in reference.items():
            got = ranks[0]["logits"][s]
            assert got.shape == expected.shape
            diff = (got - expected).abs().max()
            assert diff < 1e-4, f"{case}, seq {s}: max abs diff {diff}"
            assert torch.equal(got.argmax(-1), expected.argmax(-1)), f"{case}, seq {s}: greedy tokens differ"
            for r in range(1, world_size):  # every rank samples from the same logits, bit for bit
                assert torch.equal(ranks[r]["logits"][s], got), f"{case}, seq {s}: rank {r}'s logits differ"
        _check_share(case, dirs[case], ranks, world_size)


def _check_share(case: str, model_dir: Path, ranks: list[dict], world_size: int) -> None:
    """Each rank holds about 1/N of the model's parameter bytes, and its sharded tensors 1/N of their rows."""
    config = ModelConfig.from_dir(model_dir)
    whole = _meta_model(config, TPGroup())
    total = sum(p.numel() * 4 for p in whole.parameters())
    shapes = {name: tuple(p.shape) for name, p in whole.named_parameters()}
    for r, record in enumerate(ranks):
        # above 1/N: what every rank holds whole (norms, biases of row-parallel linears, OPT's projections,
        # KV heads when there are fewer than ranks): 1-2% of these small models
        share = record["bytes"] / total
        assert share < 1 / world_size + 0.025, f"{case}: rank {r} holds {share:.3f} of the parameter bytes"
        for name in ("embed_tokens.weight", "wte.weight", "embed_in.weight", "lm_head.weight"):
            if name in shapes:
                assert record["shapes"][name][0] == -(-shapes[name][0] // world_size), (case, name)
