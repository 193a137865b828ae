"""CPU memory of a training run: hand the memory a step freed back to the system at each step's end.

Why: glibc's malloc serves a block above its mmap threshold (128 KiB at start) from its own mapping,
returned to the system when freed, but each time such a block is freed it raises the threshold to
that block's size (up to 32 MiB). After the first steps nearly every activation of a CPU training
step is carved out of the heap arenas instead, and a freed one stays there. With padded batches whose
length changes every step, each step's activations rarely fit the holes the last one left, so the
arenas keep growing: RSS follows the allocation history rather than the live tensors (measured in
bench/results/allocator.md).

What: after every optimizer step (a post-hook on the optimizer, so the loop itself is untouched)
``malloc_trim(0)`` returns the arenas' free pages to the system. At that point the step's activations
are freed and the next step's are not yet allocated, so little is free-then-reused: the cost is one
walk over the free lists and the page faults that re-populate memory the next step touches.

Only on CPU and only with glibc (other C libraries have no malloc_trim: nothing is installed there).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import torch


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim`` as a ctypes function, or None (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    fn = getattr(libc, "malloc_trim", None)
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_freed_memory() -> bool:
    """Return the C heap's free pages to the system now; False where the C library cannot."""
    fn = _malloc_trim()
    return bool(fn is not None and fn(0) is not None)


def release_after_each_step(optimizer: torch.optim.Optimizer, device: str):
    """On CPU with glibc, call :func:`release_freed_memory` after every ``optimizer.step()``.

    Args:
        optimizer: the run's optimizer (its step post-hook does the work).
        device: the run's device; nothing is installed for CUDA (its caching allocator owns that memory).

    Returns:
        The hook's handle (``.remove()`` undoes it), or None when nothing was installed.
    """
    if device != "cpu" or _malloc_trim() is None:
        return None
    return optimizer.register_step_post_hook(lambda *_: release_freed_memory())
