"""Process settings that make JAX on CPU faster (call them before the first JAX computation),
and the compute dtype that is fastest on this machine."""

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
    # -1: never trim. Not 2**31 - 1, the largest positive int: a step that frees more than
    # 2 GiB at the top of the heap (two `base` models in one benchmark process) was then
    # trimmed, and the next step page-faulted it back in.
    _M_TRIM_THRESHOLD: ("MALLOC_TRIM_THRESHOLD_", -1),
    _M_TOP_PAD: ("MALLOC_TOP_PAD_", 256 << 20),
}

# The same settings as environment variables, for child processes (e.g. a benchmark peer):
# glibc reads mallopt's int as a size_t (-1 is SIZE_MAX), and the variables as size_t.
KEEP_FREED_MEMORY_ENV = {name: str(ctypes.c_size_t(value).value)
                         for name, value in _SETTINGS.values()}


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


# CPU feature flags (Linux /proc/cpuinfo) of bf16 x bf16 -> float32 dot-product units that
# XLA:CPU uses: AVX512-BF16 (Zen 4, Cooper Lake and later Xeons) and AMX (Sapphire Rapids+).
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags as Linux lists them (empty where that file is absent)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_compute_dtype(backend: str | None = None, flags: set[str] | None = None) -> str:
    """The compute dtype that trains fastest here, as `TransformerConfig(dtype="auto")` picks it:
    "bfloat16" on a GPU/TPU and on a CPU with bf16 dot-product units (NATIVE_BF16_CPU_FLAGS),
    "float32" on other CPUs, where XLA emulates bf16 products and float32 is faster.

    backend: JAX's default backend (asked from JAX when None, which starts it); flags: the
    CPU's feature flags (`cpu_flags()` when None).
    """
    if backend is None:
        import jax

        backend = jax.default_backend()
    if backend != "cpu":
        return "bfloat16"
    flags = cpu_flags() if flags is None else flags
    return "bfloat16" if flags & set(NATIVE_BF16_CPU_FLAGS) else "float32"
