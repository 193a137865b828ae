"""The CPU allocator fix: freed heap memory goes back to the system at each optimizer step's end."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lorakit.train import memory

glibc = pytest.mark.skipif(memory._malloc_trim() is None, reason="needs glibc's malloc_trim")


def _rss() -> int:
    return int(re.search(r"^VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024


@glibc
def test_release_returns_freed_heap_blocks_to_the_system():
    # freeing a 16 MiB mapped block raises glibc's mmap threshold to 16 MiB: the 4 MiB blocks below then
    # come from the heap, and the last one kept alive stops free() from trimming the heap's top
    big = torch.ones(4 * 2**20)  # 16 MiB
    del big
    blocks = [torch.ones(2**20) for _ in range(64)]  # 64 × 4 MiB, pages touched
    keep = blocks.pop()
    before = _rss()
    del blocks
    held = _rss() - (before - 63 * 4 * 2**20)  # what free() left resident of the 252 MiB
    if held < 0.8 * 63 * 4 * 2**20:
        pytest.skip("malloc returned the blocks by itself (a fixed MALLOC_MMAP_THRESHOLD_?)")
    assert memory.release_freed_memory()
    assert before - _rss() > 0.9 * 63 * 4 * 2**20  # the freed 252 MiB left the process
    del keep


@glibc
def test_the_hook_runs_after_every_optimizer_step(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "release_freed_memory", lambda: calls.append(1) or True)
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    handle = memory.release_after_each_step(opt, "cpu")
    for _ in range(3):
        w.sum().backward()
        opt.step()
    assert len(calls) == 3 and torch.allclose(w.detach(), torch.full((3,), 0.4))  # grads accumulate: 1 - 0.1·(1 + 2 + 3)
    handle.remove()
    opt.step()
    assert len(calls) == 3
    assert memory.release_after_each_step(opt, "cuda") is None  # CUDA's caching allocator owns that memory
