"""Our models on a CUDA GPU (Triton kernels) against transformers on the same GPU, fp32 and bf16.

bf16 cannot match token for token over long runs, so it is held to log-probabilities close to an fp32
reference and to transformers' own bf16 error. Run as a script to print the measured differences.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from gpu_worker.loader import load_model
from tests.factories import MODEL_CASES, make_checkpoint, run_mixed_steps

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def compare(model_dir, dtype: torch.dtype, block_size: int = 16) -> dict[str, float]:
    """Max abs differences of log-probabilities: ours and HF's in ``dtype`` against HF in fp32."""
    device = torch.device("cuda")
    model, config = load_model(model_dir, device, dtype)
    computed, ours = run_mixed_steps(model, config, block_size, dtype, device)
    hf = {}
    for hf_dtype in {torch.float32, dtype}:
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=hf_dtype, attn_implementation="sdpa")
        ref = ref.to(device).eval()
        with torch.no_grad():
            hf[hf_dtype] = {
                s: ref(torch.tensor([ids], device=device)).logits[0].float().cpu() for s, ids in computed.items()
            }
    stats = {"ours": 0.0, "hf": 0.0, "greedy_mismatch_fp32": 0.0}
    for s in computed:
        exact = hf[torch.float32][s].log_softmax(-1)
        stats["ours"] = max(stats["ours"], (ours[s].log_softmax(-1) - exact).abs().max().item())
        stats["hf"] = max(stats["hf"], (hf[dtype][s].log_softmax(-1) - exact).abs().max().item())
        if dtype == torch.float32:
            mismatches = (ours[s].argmax(-1) != exact.argmax(-1)).sum().item()
            stats["greedy_mismatch_fp32"] += mismatches
    return stats


@pytest.fixture(scope="module")
def case_dirs(tmp_path_factory):
    return {
        case: make_checkpoint(tmp_path_factory.mktemp(case), arch, **ov) for case, (arch, ov) in MODEL_CASES.items()
    }


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_fp32_on_gpu(case_dirs, case):
    stats = compare(case_dirs[case], torch.float32)
    assert stats["ours"] < 1e-3, stats
    assert stats["greedy_mismatch_fp32"] == 0, stats


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bf16_on_gpu(case_dirs, case):
    stats = compare(case_dirs[case], torch.bfloat16)
    # no worse than transformers' own bf16, with room for a different rounding order
    assert stats["ours"] < max(0.15, 2 * stats["hf"]), stats


if __name__ == "__main__":
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        for case, (arch, overrides) in MODEL_CASES.items():
            model_dir = make_checkpoint(Path(tmp) / case, arch, **overrides)
            for dtype in (torch.float32, torch.bfloat16):
                for block_size in (16, 1):
                    print(case, dtype, block_size, compare(model_dir, dtype, block_size), flush=True)
