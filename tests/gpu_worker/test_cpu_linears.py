"""fp32 linears through oneDNN with packed weights (the CPU runner's): every family still matches
transformers (logits within 1e-4, the same greedy tokens), biases, row-parallel and tied heads included."""

import pytest
import torch
from torch import nn

from gpu_worker.cpu_linears import PackedLinear, onednn_available, pack_linears
from gpu_worker.loader import load_model
from gpu_worker.models.parallel import SINGLE, RowParallelLinear
from tests.factories import MODEL_CASES as CASES
from tests.factories import run_mixed_steps
from tests.gpu_worker.test_models import _hf_logits, _one_thread, case_dirs  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN linears")


@pytest.mark.parametrize("case", list(CASES))
def test_packed_model_matches_transformers(case_dirs, case):  # noqa: F811
    model_dir = case_dirs(case)
    model, config = load_model(model_dir, torch.device("cpu"), torch.float32)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert pack_linears(model) == len(linears) > 0
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert pack_linears(model) == 0  # idempotent: nothing left to pack
    computed, ours = run_mixed_steps(model, config, 16)
    for s, expected in _hf_logits(model_dir, computed).items():
        assert (ours[s] - expected).abs().max() < 1e-4, f"seq {s}: max abs diff {(ours[s] - expected).abs().max()}"
        assert torch.equal(ours[s].argmax(-1), expected.argmax(-1)), f"seq {s}: greedy tokens differ"


def test_packed_linear_is_the_same_product():
    torch.manual_seed(0)
    for linear in (nn.Linear(48, 80), nn.Linear(48, 80, bias=False), RowParallelLinear(48, 80, True, SINGLE)):
        packed = PackedLinear(linear)
        for rows in (1, 3, 8, 100):
            x = torch.randn(rows, 48)
            torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)


def test_other_dtypes_and_devices_are_left_alone():
    model = nn.Sequential(nn.Linear(8, 8).to(torch.bfloat16), nn.Linear(8, 8).to(torch.float64))
    assert pack_linears(model) == 0
    assert all(isinstance(m, nn.Linear) for m in model)
