"""kernels/bench/attention_split_check.py runs on a GPU only; here its arguments, and its output checks
on small cells under the interpreter (timing stubbed), with the tree's own kernel as the "old" one."""

import importlib
import sys
from pathlib import Path

import pytest
import torch

from kernels.bench import attention_split_check as check

paged_attention = importlib.import_module("kernels.paged_attention")  # kernels exports the function

OLD = "old_paged_attention"  # the module name load_old gives the old file


def test_arguments():
    args = check.parse_args(["/tmp/old.py"])
    assert (args.old, args.rounds, args.atol) == (Path("/tmp/old.py"), 4, 0.0)
    with pytest.raises(SystemExit):
        check.parse_args(["/tmp/old.py", "--rounds", "0"])
    with pytest.raises(SystemExit, match="is not a file"):
        check.load_old(Path("/nonexistent/paged_attention.py"))


def run_cells(monkeypatch, old_path: Path, cells) -> list[dict]:
    timed = []

    def fake_timing(old_fn, new_fn, rounds, rep_ms):
        timed.append((old_fn(), new_fn()))  # the timed callables run and return outputs
        return [1.0] * rounds, [1.0] * rounds

    monkeypatch.setattr(check, "time_interleaved", fake_timing)
    monkeypatch.delitem(sys.modules, OLD, raising=False)
    old = check.load_old(old_path)
    args = check.parse_args([str(old_path), "--rounds", "2"])
    gen = torch.Generator().manual_seed(0)
    rows = [check.check_cell(old, paged_attention, *cell, args, gen, torch.device("cpu")) for cell in cells]
    assert len(timed) == len(cells)
    for old_out, new_out in timed:
        assert torch.equal(old_out, new_out)
    return rows


def test_same_kernel_passes(interpreter, monkeypatch):
    rows = run_cells(monkeypatch, Path(paged_attention.__file__), [("decode", 2, 64, 1), ("prefill", 1, 32, 32)])
    for row in rows:
        assert row["failures"] == [], row
        assert row["max_abs_diff"] == 0.0
        assert set(row["ref_err"]) == {"old", "new"} and max(row["ref_err"].values()) <= check.REF_TOL
        assert row["old_ms"] == row["new_ms"] == [1.0, 1.0]


def test_changed_kernel_fails(interpreter, monkeypatch, tmp_path):
    """An "old" kernel with another softmax base gives other outputs: the check must say so."""
    source = Path(paged_attention.__file__).read_text()
    assert "_LOG2E = 1.4426950408889634" in source
    changed = tmp_path / "paged_attention.py"
    changed.write_text(source.replace("_LOG2E = 1.4426950408889634", "_LOG2E = 1.0"))
    with pytest.raises(AssertionError):  # the timed outputs differ too
        run_cells(monkeypatch, changed, [("decode", 2, 64, 1)])
    row = check.check_cell(sys.modules[OLD], paged_attention, "decode", 2, 64, 1,
                           check.parse_args([str(changed)]), torch.Generator().manual_seed(0), torch.device("cpu"))
    assert row["max_abs_diff"] > 0
    assert any(f.startswith("max |old - new|") for f in row["failures"])
    assert any(f.startswith("old off the reference") for f in row["failures"])
