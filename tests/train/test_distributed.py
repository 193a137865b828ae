"""torchrun on CPU/gloo: 2 processes give the same adapter as 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def _data(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"prompt": f"{i} is a number, say ", "completion": "yes" if i % 2 else "no"} for i in range(32)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(model_dir, tmp_path, out, nproc, *extra, expect_ok=True):
    args = ["train", "--model", str(model_dir), "--data", str(_data(tmp_path)), "--eval-data",
            str(_data(tmp_path)), "--out", str(tmp_path / out), "--max-steps", "6", "--batch-size", "8",
            "--lr", "1e-2", "--warmup-steps", "1", "--max-seq-len", "32", "--r", "4", "--eval-every", "3",
            "--save-every", "3", "--log-every", "1", "--seed", "1", "--nproc", str(nproc), "--dtype", "float32", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    proc = subprocess.run([sys.executable, "-m", "lorakit", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _adapter(tmp_path, out):
    return load_file(tmp_path / out / "adapter" / "adapter_model.safetensors")


def _close(a, b, tol=1e-5):
    assert a.keys() == b.keys() and len(a) > 0
    return max((a[k] - b[k]).abs().max().item() for k in a) < tol


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "ddp-packed"])
def test_two_processes_equal_one(tiny_model_dir, tmp_path, mode):
    packed = ["--packing", "--max-seq-len", "64", "--batch-size", "4"] if mode == "ddp-packed" else []
    _run(tiny_model_dir, tmp_path, "single", 1, *packed)
    extra = (["--fsdp"] if mode == "fsdp" else []) + packed
    _run(tiny_model_dir, tmp_path, mode, 2, *extra)
    assert _close(_adapter(tmp_path, "single"), _adapter(tmp_path, mode))
    summary = json.loads((tmp_path / mode / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["sharded"] == (mode == "fsdp")
    assert ("fill_rate" in summary["data"]["train"]) == bool(packed)
    single = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert abs(summary["final_eval_loss"] - single["final_eval_loss"]) < 1e-5

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                           str(tmp_path / mode / "adapter"))
    assert sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n) > 0
    assert (tmp_path / mode / "adapter" / "adapter_model.safetensors").stat().st_size > 1000


def test_two_process_resume_matches_uninterrupted(tiny_model_dir, tmp_path):
    _run(tiny_model_dir, tmp_path, "straight", 2)
    # stop after the step-3 checkpoint by asking for 3 steps with the same schedule, then resume to 6
    (tmp_path / "cut").mkdir()
    _run(tiny_model_dir, tmp_path, "cut", 2, "--stop-after", "3")
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-0000003"]
    _run(tiny_model_dir, tmp_path, "cut", 2, "--resume")
    assert _close(_adapter(tmp_path, "straight"), _adapter(tmp_path, "cut"), 1e-6)


def test_ddp_buckets_only_lora_parameters(tiny_model_dir):
    """DDP registers only parameters that require grad: the frozen base is never all-reduced."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from transformers import AutoModelForCausalLM

    import lorakit as lk

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = lk.inject(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lk.LoraConfig(r=4))
        ddp = DDP(model)
        lora_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        assert ddp._get_ddp_logging_data()["total_parameter_size_bytes"] == lora_bytes
        assert lora_bytes < sum(p.numel() * p.element_size() for p in model.parameters()) / 5
    finally:
        dist.destroy_process_group()
    torch.manual_seed(0)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                with open(f"/proc/{stat}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(stat))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _rank_process(pid: int, rank: int) -> int | None:
    for child in _descendants(pid):
        try:
            with open(f"/proc/{child}/environ", "rb") as f:
                if f"\0RANK={rank}\0".encode() in b"\0" + f.read():
                    return child
        except OSError:
            continue
    return None


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the rank's process through /proc")
def test_a_dead_rank_fails_the_run_instead_of_hanging(tiny_model_dir, tmp_path):
    """kill -9 rank 1 mid-training: torchrun's agent stops rank 0 and the run exits non-zero, long
    before the collective timeout, with no adapter written."""
    import signal
    import time

    out = tmp_path / "dead"
    args = ["train", "--model", str(tiny_model_dir), "--data", str(_data(tmp_path)), "--out", str(out),
            "--max-steps", "400", "--batch-size", "8", "--max-seq-len", "32", "--r", "4", "--eval-every", "0",
            "--save-every", "0", "--log-every", "1", "--nproc", "2", "--dtype", "float32", "--dist-timeout", "120"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 3:  # both ranks are past a few steps
            break
        time.sleep(0.05)
    victim = _rank_process(proc.pid, 1)
    assert proc.poll() is None and victim is not None, "the run ended or rank 1 was not found"
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    try:
        code = proc.wait(timeout=100)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code != 0
    assert time.monotonic() - killed_at < 60  # torchrun noticed the dead worker; no wait for the 120 s timeout
    assert not (out / "adapter").exists()
