"""torchrun on CPU/gloo with DPO: 2 processes give the adapter, the loss curve and TRL's figures of 1 process on
the same global batch, with the reference computed each step (the adapters switched off) or once before the
first step (--precompute-ref), replicated (DDP) or sharded (FSDP2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

# 12 pairs, 2 of them conversational; a global batch of 4 pairs is 2 per process; 7 held-out pairs (the last
# eval batch is 3 pairs: one rank gets 1, the other 2)
ROWS = [{"prompt": f"{i} is ", "chosen": "even" if i % 2 == 0 else "odd", "rejected": "odd!" if i % 2 == 0 else "even"}
        for i in range(17)]
CONV = [{"prompt": [{"role": "user", "content": f"{i}?"}], "chosen": [{"role": "assistant", "content": "yes"}],
         "rejected": [{"role": "assistant", "content": "no"}]} for i in range(2)]
FIGURES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
           "eval_loss", "eval_rewards/margins", "eval_logps/chosen", "eval_logps/rejected")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(model_dir, tmp_path, out, nproc, *extra):
    train = _write(tmp_path / "train.jsonl", ROWS[:10] + CONV)
    held = _write(tmp_path / "eval.jsonl", ROWS[10:])
    args = ["train", "--model", str(model_dir), "--objective", "dpo", "--data", str(train), "--eval-data", str(held),
            "--out", str(tmp_path / out), "--max-steps", "5", "--batch-size", "4", "--lr", "1e-2", "--warmup-steps",
            "1", "--max-seq-len", "48", "--r", "4", "--eval-every", "5", "--log-every", "1", "--seed", "3",
            "--nproc", str(nproc), "--dtype", "float32", "--data-cache", str(tmp_path / "cache" / out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    proc = subprocess.run([sys.executable, "-m", "lorakit", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp_path / out / "summary.json").read_text())


@pytest.fixture(scope="module")
def single(tiny_model_dir, tmp_path_factory):
    """The 1-process run every mode is compared with (run once)."""
    root = tmp_path_factory.mktemp("dpo-single")
    _run(tiny_model_dir, root, "single", 1)
    return root / "single"


def _curve(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in FIGURES if k in r} for r in rows]


@pytest.mark.parametrize("mode", ["ddp", "ddp-precompute-ref", "fsdp"])
def test_two_processes_equal_one(tiny_model_dir, single, tmp_path, mode):
    extra = {"ddp": [], "ddp-precompute-ref": ["--precompute-ref"], "fsdp": ["--fsdp"]}[mode]
    summary = _run(tiny_model_dir, tmp_path, mode, 2, *extra)
    assert summary["processes"] == 2 and summary["sharded"] == (mode == "fsdp")
    if mode == "ddp-precompute-ref":  # the reference really was computed once (and cached by rank 0 alone)
        assert len(list((tmp_path / "cache" / mode / "reference").glob("*.safetensors"))) == 2  # train, eval

    a = load_file(single / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / mode / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    # float noise (each rank pads to its own widest row; DDP sums two halves) reaches the adapter through Adam,
    # which turns a near-zero gradient entry's noise into a full-size step (7e-5 of a factor's scale seen)
    assert max(((a[k] - b[k]).abs().max() / a[k].abs().max()).item() for k in a) < 1e-4
    one, two = _curve(single), _curve(tmp_path / mode)
    assert len(two) == len(one) == 6  # 5 steps, 1 evaluation
    for s, d in zip(one, two, strict=True):
        assert d.keys() == s.keys()
        assert d == {k: pytest.approx(v, rel=1e-4, abs=1e-6) for k, v in s.items()}
    assert one[-2]["loss"] < one[0]["loss"]  # it learned something, so equal curves say something
