"""The CPU allocator fix: with glibc's mmap threshold fixed, freed activation-sized blocks go back to
the system at once (glibc's default keeps them in the heap after its threshold has risen)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lorakit.train import memory

glibc = pytest.mark.skipif(memory._glibc() is None, reason="needs glibc's mallopt and malloc_trim")

# Free a 16 MiB mapped block (glibc's default then raises its mmap threshold to 16 MiB), allocate 63 + 1
# blocks of 4 MiB with their pages touched, free 63 of them (the last one alive keeps free() from trimming
# the heap's top) and report how much of the freed 252 MiB is still resident.
_SCRIPT = """
import json, re, sys
from pathlib import Path
import torch
from lorakit.train import memory
def rss():
    return int(re.search(r"^VmRSS:\\s+(\\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024
fixed = memory.fix_mmap_threshold("cpu") if sys.argv[1] == "fix" else False
big = torch.ones(4 * 2**20)
del big
blocks = [torch.ones(2**20) for _ in range(64)]
keep = blocks.pop()
before = rss()
del blocks
print(json.dumps({"fixed": fixed, "held": rss() - (before - 63 * 4 * 2**20)}))
"""


def _held(mode: str) -> dict:
    env_free = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, timeout=300,
                         env={**env_free, "OMP_NUM_THREADS": "1"}, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow  # two fresh interpreters allocating and freeing (about 10 s on 2 shared cores)
@glibc
def test_a_fixed_threshold_returns_freed_blocks_that_the_default_keeps():
    freed = 63 * 4 * 2**20
    default, fixed = _held("default"), _held("fix")
    assert not default["fixed"] and fixed["fixed"]
    assert default["held"] > 0.8 * freed  # the inflation: freed, yet resident
    assert fixed["held"] < 0.1 * freed  # each block had its own mapping, unmapped when freed


def test_nothing_changes_on_cuda():
    assert memory.fix_mmap_threshold("cuda") is False
    assert memory.fix_mmap_threshold("cuda:0") is False


@glibc
def test_low_cpu_memory_fixes_the_threshold_at_set_up(tiny_model_dir, tmp_path, monkeypatch):
    import lorakit.train.loop as loop
    from lorakit.train.recipe import TrainConfig

    calls = []
    monkeypatch.setattr(loop, "fix_mmap_threshold", lambda device: calls.append(device) or True)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(4)))
    for flag in (False, True):
        loop.train(TrainConfig(model=str(tiny_model_dir), data=str(data), out=str(tmp_path / f"run-{flag}"),
                               max_steps=1, batch_size=2, max_seq_len=16, r=2, dtype="float32",
                               low_cpu_memory=flag), progress=False)
    assert calls == ["cpu"]  # only with --low-cpu-memory


# ---- the allocator choice (--cpu-allocator) -------------------------------------------------------

tcmalloc = pytest.mark.skipif(not memory.tcmalloc_installed(),
                              reason=f"tcmalloc is not installed ({memory.TCMALLOC_INSTALL})")


def test_preload_env_decides_when_to_restart(monkeypatch):
    from lorakit.errors import ConfigError

    monkeypatch.setattr(memory, "tcmalloc_installed", lambda: True)
    env = memory.preload_env("auto", {"PATH": "/bin", "LD_PRELOAD": "libother.so"})
    assert env["LD_PRELOAD"] == f"{memory.TCMALLOC} libother.so" and env["PATH"] == "/bin"
    assert memory.preload_env("auto", env) is None  # restarted once, never again
    assert memory.preload_env("tcmalloc", {"LD_PRELOAD": memory.TCMALLOC}) is None  # preloaded by the user
    assert memory.preload_env("glibc", {}) is None
    monkeypatch.setattr(memory, "tcmalloc_installed", lambda: False)
    assert memory.preload_env("auto", {}) is None  # nothing to preload: glibc, as before
    with pytest.raises(ConfigError, match="apt-get install libtcmalloc-minimal4"):
        memory.preload_env("tcmalloc", {})
    with pytest.raises(ConfigError, match="auto, tcmalloc, glibc"):
        memory.preload_env("mimalloc", {})


def test_the_python_api_says_how_to_get_tcmalloc():
    from lorakit.errors import TrainingError

    assert memory.allocator_in_use() == "glibc"  # pytest runs with the C library's malloc
    assert memory.check_allocator("auto") == "glibc"
    with pytest.raises(TrainingError, match=f"LD_PRELOAD={memory.TCMALLOC}"):
        memory.check_allocator("tcmalloc")


def _train(model_dir, tmp_path, name, *flags):
    import os

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + 1 =", "completion": f" {i + 1}"}) + "\n" for i in range(8)))
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "LORAKIT_ALLOCATOR_SET")}
    proc = subprocess.run([sys.executable, "-m", "lorakit", "train", "--model", str(model_dir), "--data", str(data),
                           "--out", str(tmp_path / name), "--max-steps", "1", "--batch-size", "4", "--max-seq-len",
                           "16", "--r", "2", "--dtype", "float32", "--eval-every", "0", *flags],
                          capture_output=True, text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1",
                                                                            "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr, json.loads((tmp_path / name / "summary.json").read_text())


@tcmalloc
def test_lorakit_train_restarts_itself_with_tcmalloc(tiny_model_dir, tmp_path):
    out, summary = _train(tiny_model_dir, tmp_path, "auto")
    assert "CPU allocator: tcmalloc" in out and summary["cpu_allocator"] == "tcmalloc"  # read from /proc/self/maps
    out, summary = _train(tiny_model_dir, tmp_path, "glibc", "--cpu-allocator", "glibc", "--low-cpu-memory")
    assert "CPU allocator: glibc with the fixed mmap threshold" in out and summary["cpu_allocator"] == "glibc"
