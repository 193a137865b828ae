"""torchrun on CPU/gloo with a model of your own and a loss function: 2 processes give the adapter (and the
eval figures) of 1 process on the same global batch, replicated (DDP) or sharded (FSDP2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from test_custom_train import grid  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow


def _run(src, data, out, nproc, *extra):
    args = ["train", "--model", f"{src}:build", "--loss", f"{src}:row_loss", "--data", str(data), "--eval-data",
            str(data), "--out", str(out), "--max-steps", "4", "--batch-size", "4", "--lr", "1e-2", "--warmup-steps",
            "1", "--target-modules", "wqkv", "wo", "--modules-to-save", "head", "--eval-every", "2", "--log-every",
            "1", "--nproc", str(nproc), "--dtype", "float32", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    proc = subprocess.run([sys.executable, "-m", "lorakit", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one(grid, tmp_path, mode):  # noqa: F811
    src, _, data = grid
    single = _run(src, data, tmp_path / "single", 1)
    double = _run(src, data, tmp_path / mode, 2, *(["--fsdp"] if mode == "fsdp" else []))
    assert double["processes"] == 2 and double["sharded"] == (mode == "fsdp")
    a = load_file(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / mode / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("head" in k for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert double["final_eval_loss"] == pytest.approx(single["final_eval_loss"], rel=1e-5)

    def logged(run):
        return [[r[k] for k in ("loss", "first_stream", "eval_loss", "eval_first_stream") if k in r]
                for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())]
    assert logged(mode) == [pytest.approx(r, rel=1e-5) for r in logged("single")]
