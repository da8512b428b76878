"""Process settings that make JAX on CPU faster; call them before the first JAX computation."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import pkgutil

# glibc mallopt parameters (malloc.h) and the values `keep_freed_memory` sets.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8
_SETTINGS = {
    _M_ARENA_MAX: ("MALLOC_ARENA_MAX", 1),
    _M_MMAP_THRESHOLD: ("MALLOC_MMAP_THRESHOLD_", 1 << 30),
    _M_TRIM_THRESHOLD: ("MALLOC_TRIM_THRESHOLD_", (1 << 31) - 1),
    _M_TOP_PAD: ("MALLOC_TOP_PAD_", 256 << 20),
}

# The same settings as environment variables, for child processes (e.g. a benchmark peer).
KEEP_FREED_MEMORY_ENV = {name: str(value) for name, value in _SETTINGS.values()}


def accelerator_expected() -> bool:
    """Whether JAX will run on a GPU/TPU, decided without starting JAX.

    `JAX_PLATFORMS` decides when set (its first entry); otherwise an installed GPU/TPU plugin
    (a module of the `jax_plugins` namespace package, or `libtpu`) counts as an accelerator.
    """
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() != "cpu"
    try:
        import jax_plugins  # namespace package of JAX's PJRT plugins (CUDA, ROCm, ...)

        if any(True for _ in pkgutil.iter_modules(jax_plugins.__path__)):
            return True
    except ImportError:
        pass
    return importlib.util.find_spec("libtpu") is not None


def keep_freed_memory(*, on_accelerator: bool = False) -> bool:
    """Tell glibc malloc to keep freed memory instead of handing it back to the kernel.

    XLA:CPU allocates and frees ~100 MB of temporaries per training step. By default glibc
    serves them from per-thread arenas that return the pages to the kernel, so every step
    page-faults them back in (millions of faults; a third of the CPU time in the kernel). One
    arena, no mmap below 1 GiB and no trimming make small training steps about 2x faster on a
    2-core CPU; resident memory then stays at its peak. Call it before JAX starts its thread
    pool (importing flax_transformer does not): set later, it no longer helps.

    A CPU setting: where `accelerator_expected()` it does nothing unless `on_accelerator`
    (measured on CPU only; on an H200 machine a benchmark with it set ran far slower than with
    glibc's defaults, cause unconfirmed). Returns whether the settings were applied (False
    also where glibc is absent).
    """
    if not on_accelerator and accelerator_expected():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, (_, value) in _SETTINGS.items())
