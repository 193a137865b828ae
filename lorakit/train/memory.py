"""CPU memory of a training run: keep the C allocator from holding freed activations.

Two remedies, measured side by side in bench/results/allocator.md (SmolLM2 cut to 6 layers, fp32,
padded chat batches of changing length, AMD EPYC): **tcmalloc** (``--cpu-allocator``, default auto:
``lorakit train`` restarts itself with it preloaded where it is installed) 0.70x glibc's peak RSS at
0.96x its step time; the **fixed mmap threshold** below (``--low-cpu-memory``, for machines without
tcmalloc) 0.66x the peak RSS but 1.28x the step time. jemalloc measured 0.68x / 1.25x.

Why: glibc's malloc serves a block above its mmap threshold (128 KiB at start) from its own mapping,
returned to the system when freed, but each time such a block is freed it raises the threshold to
that block's size (up to 32 MiB). After the first steps nearly every activation of a CPU training
step is carved out of the heap arenas instead, and a freed one stays there. With padded batches whose
length changes every step, new activations rarely fit the holes the freed ones left, so the arenas
keep growing: RSS follows the allocation history rather than the live tensors.

What: with ``--low-cpu-memory`` the run's set-up calls ``mallopt(M_MMAP_THRESHOLD, 128 KiB)``, which
fixes the threshold (and turns off its dynamic raising), so every block above 128 KiB keeps its own
mapping and goes back to the system when freed; ``malloc_trim(0)`` then returns what the heap holds
free. Measured in bench/results/allocator.md: 0.66x the peak RSS of glibc's default on padded chat
batches, but 1.28x the step time (1.47x in an earlier run on a loaded machine): each large block is
mapped and zero-filled by the kernel anew, where the heap reused warm pages, so it is off by default.
tcmalloc keeps freed spans in per-size free lists that later blocks of other sizes reuse, and hands
pages back to the system gradually, so it neither piles up holes nor pays a page fault per block. Returning free pages after each step
instead (``malloc_trim`` as an optimizer post-hook) was measured too and saves little (0.96x the
peak in one round): the peak is reached inside a step, where freed blocks are already fragmented.

Only on CPU and only with glibc (other C libraries lack these calls: nothing is changed there).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from pathlib import Path

from ..errors import ConfigError, TrainingError

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


# ---- the allocator of the process --------------------------------------------------------------

TCMALLOC = "libtcmalloc_minimal.so.4"  # Debian/Ubuntu: libtcmalloc-minimal4; Fedora: gperftools-libs
TCMALLOC_INSTALL = "apt-get install libtcmalloc-minimal4 (Debian/Ubuntu) or dnf install gperftools-libs (Fedora)"
ALLOCATORS = ("auto", "tcmalloc", "glibc")


def allocator_in_use() -> str:
    """"tcmalloc" or "jemalloc" when one is mapped into this process (preloaded), else "glibc" (or the
    C library's own malloc where /proc is missing)."""
    try:
        maps = Path("/proc/self/maps").read_text(errors="replace")
    except OSError:
        return "glibc"
    return next((name for name in ("tcmalloc", "jemalloc") if f"lib{name}" in maps), "glibc")


def tcmalloc_installed() -> bool:
    """Whether the dynamic loader can find tcmalloc (what LD_PRELOAD would load)."""
    return ctypes.util.find_library("tcmalloc_minimal") is not None


def preload_env(choice: str, environ: dict[str, str]) -> dict[str, str] | None:
    """The environment to restart ``lorakit train`` with so that tcmalloc serves every allocation, or
    None to go on as is (already preloaded, "glibc", or "auto" without tcmalloc installed).

    Raises:
        ConfigError: ``choice`` is not one of ALLOCATORS, or "tcmalloc" is asked for and not installed.
    """
    if choice not in ALLOCATORS:
        raise ConfigError(f"cpu_allocator must be one of {', '.join(ALLOCATORS)}, got {choice!r}")
    if choice == "glibc" or TCMALLOC in environ.get("LD_PRELOAD", "") or environ.get("LORAKIT_ALLOCATOR_SET"):
        return None
    if not tcmalloc_installed():
        if choice == "tcmalloc":
            raise ConfigError(f"--cpu-allocator tcmalloc: {TCMALLOC} is not installed; {TCMALLOC_INSTALL}, or use "
                              "--cpu-allocator glibc (with --low-cpu-memory to bound its RSS at a step-time cost)")
        return None
    preload = " ".join(filter(None, [TCMALLOC, environ.get("LD_PRELOAD", "")]))
    return {**environ, "LD_PRELOAD": preload, "LORAKIT_ALLOCATOR_SET": "1"}  # the flag stops a second restart


def check_allocator(choice: str) -> str:
    """The allocator this process runs with, checked against ``choice`` (the Python API cannot preload one).

    Raises:
        TrainingError: "tcmalloc" is asked for and this process does not run it.
    """
    used = allocator_in_use()
    if choice == "tcmalloc" and used != "tcmalloc":
        raise TrainingError(f"cpu_allocator='tcmalloc' but this process allocates with {used}: start Python with "
                            f"LD_PRELOAD={TCMALLOC} (lorakit train does it itself), or pass cpu_allocator='auto'")
    return used
