"""CPU memory of a training run: keep glibc's malloc from holding freed activations.

Why: glibc's malloc serves a block above its mmap threshold (128 KiB at start) from its own mapping,
returned to the system when freed, but each time such a block is freed it raises the threshold to
that block's size (up to 32 MiB). After the first steps nearly every activation of a CPU training
step is carved out of the heap arenas instead, and a freed one stays there. With padded batches whose
length changes every step, new activations rarely fit the holes the freed ones left, so the arenas
keep growing: RSS follows the allocation history rather than the live tensors.

What: with ``--low-cpu-memory`` the run's set-up calls ``mallopt(M_MMAP_THRESHOLD, 128 KiB)``, which
fixes the threshold (and turns off its dynamic raising), so every block above 128 KiB keeps its own
mapping and goes back to the system when freed; ``malloc_trim(0)`` then returns what the heap holds
free. Measured in bench/results/allocator.md: 0.67x the peak RSS of glibc's default on padded chat
batches, but 1.47x the step time (each large block is mapped and zero-filled by the kernel anew,
where the heap reused warm pages), so it is off by default. Returning free pages after each step
instead (``malloc_trim`` as an optimizer post-hook) was measured too and saves little (0.96x the
peak in one round): the peak is reached inside a step, where freed blocks are already fragmented.

Only on CPU and only with glibc (other C libraries lack these calls: nothing is changed there).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
THRESHOLD = 128 * 1024  # glibc's own initial value


@functools.lru_cache(maxsize=1)
def _glibc():
    """glibc as a ctypes library (with mallopt and malloc_trim), or None (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if libc is None or not all(hasattr(libc, fn) for fn in ("mallopt", "malloc_trim")):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


def fix_mmap_threshold(device: str) -> bool:
    """On CPU with glibc, fix malloc's mmap threshold at 128 KiB for the rest of the process and
    return the heap's free pages to the system. Returns whether it was done.

    Args:
        device: the run's device; nothing is changed for CUDA (its caching allocator owns that memory).
    """
    libc = _glibc()
    if device != "cpu" or libc is None:
        return False
    if libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD) != 1:  # mallopt returns 1 on success
        return False
    libc.malloc_trim(0)
    return True
