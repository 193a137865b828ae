"""torchrun on CPU/gloo with GRPO: 2 processes give the adapter and the figures of 1 process on the same global
batch (each process rolls out its prompts' groups, seeded by their place in the step, and trains on them; the
reference with the adapters switched off; a rollout batch reused for a second step)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

REWARDS = '''
def has_answer(prompts, completions, answer, **kw):
    return [float(a in c) + 0.1 * len(c) for c, a in zip(completions, answer)]
'''
FIGURES = ("loss", "reward", "reward_std", "rewards/has_answer/mean", "kl", "completions/mean_length",
           "clip_ratio/region_mean", "frac_reward_zero_std")


def _run(model_dir, root, out, nproc, batch_size):
    (root / "rewards.py").write_text(REWARDS)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {c}:", "answer": c}) + "\n" for c in "abcdefgh"))
    args = ["train", "--model", str(model_dir), "--objective", "grpo", "--data", str(data), "--reward",
            f"{root}/rewards.py:has_answer", "--num-generations", "4", "--batch-size", str(batch_size),
            "--max-completion-length", "6", "--temperature", "0.9", "--beta", "0.05", "--num-iterations", "2",
            "--out", str(root / out), "--max-steps", "4", "--lr", "2e-2", "--warmup-steps", "0", "--r", "4",
            "--eval-every", "0", "--save-every", "0", "--log-every", "1", "--seed", "3", "--nproc", str(nproc),
            "--dtype", "float32", "--data-cache", "off"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    proc = subprocess.run([sys.executable, "-m", "lorakit", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((root / out / "summary.json").read_text())


def _curve(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in FIGURES if k in r} for r in rows]


def test_two_processes_equal_one(tiny_model_dir, tmp_path):
    _run(tiny_model_dir, tmp_path, "single", 1, batch_size=8)  # 2 prompts x 4 completions a step
    summary = _run(tiny_model_dir, tmp_path, "ddp", 2, batch_size=4)  # 1 prompt x 4 completions per process
    assert summary["processes"] == 2
    a = load_file(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    single, ddp = _curve(tmp_path / "single"), _curve(tmp_path / "ddp")
    assert len(single) == 4 and single[-1]["kl"] > 0 and single[0]["reward_std"] > 0
    for one, two in zip(single, ddp, strict=True):
        assert one.keys() == two.keys()
        for k in one:
            assert two[k] == pytest.approx(one[k], rel=1e-5, abs=1e-6), k
    samples = [(tmp_path / run / "samples.jsonl").read_text() for run in ("single", "ddp")]
    assert samples[0] == samples[1]  # rank 0 shows the same completions: the first prompt's group
