"""Session settings (malloc, fast-compile XLA flags, a fresh compilation cache) and fixtures;
helpers are in helpers.py."""

import gc
import os
import shutil
import tempfile

import jax
import numpy as np
import pytest

from flax_transformer.runtime import keep_freed_memory

keep_freed_memory()  # before any test runs JAX: XLA:CPU steps ~2x faster (see runtime.py)

# Many tests build the same tiny model's train/eval steps as new jitted functions, which JAX's
# in-memory cache does not share: a compilation cache for this session (fresh, so no test ever
# reads an executable from another version of the code) compiles each program once.
# FT_TEST_COMPILE_CACHE=0 turns it off. Made in a hook, not at import: the main pytest process
# makes the directory, removes it at its end, and names it in _SHARED for its pytest-xdist
# workers, which use the same one (a program one worker compiled, the other reads: ~1 of the
# suite's ~27 CPU minutes on 2 cores, measured with XLA's default flags). The processes a test
# starts (train.py, the accelerator plan's runs, the multi-device checks) share it through
# JAX's environment variables: the G2P plan's end-to-end test took 49 s instead of 71. They
# set a size limit, which turns on JAX's file lock, so that two of them running side by side
# never read an entry while the other writes it; the pytest processes do not, as the lock also
# makes every write list the directory (3x the CI's system time when tried). An entry read
# while another process is still writing it fails to decompress, which JAX reports as a
# warning before compiling the program.
_CACHE = None  # the directory this process made (and removes)
_SHARED = "FT_TEST_SHARED_COMPILE_CACHE"
_CACHE_SETTINGS = {  # jax.config name: value (its environment variable is the name in capitals)
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
}
_CHILD_CACHE_LIMIT = 64 * 2**30  # bytes; any limit turns the lock on

# The tests' models are tiny, so compiling is most of the suite's time and running the
# programs very little. These XLA:CPU settings compile ~3x faster (a 2+2-layer model's forward
# and backward: 0.9 s instead of 3.2) for slower machine code: LLVM at -O0 and XLA's older
# loop emitters instead of its MLIR fusion emitters. They change how an HLO program becomes
# machine code, not the program: results agree up to float rounding (a run's steps are as
# reproducible as ever). With them the suite took 6-8 min instead of 15 on 2 cores (Zen 3).
# FT_TEST_FAST_COMPILE=0 runs it with XLA's defaults, as users compile; CI (.ci/run) runs the
# kernel tests that way too.
_FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0",
                       "--xla_cpu_use_fusion_emitters=false")


def _use_fast_compile_flags():
    """Adds the fast-compile flags to XLA_FLAGS (a flag the user set wins), before JAX reads
    it when its CPU backend starts; processes the tests start inherit it."""
    if os.environ.get("FT_TEST_FAST_COMPILE", "1") == "0":
        return
    flags = os.environ.get("XLA_FLAGS", "").split()
    names = {flag.split("=")[0] for flag in flags}
    flags += [flag for flag in _FAST_COMPILE_FLAGS if flag.split("=")[0] not in names]
    os.environ["XLA_FLAGS"] = " ".join(flags)


def pytest_configure(config):
    global _CACHE
    _use_fast_compile_flags()
    if os.environ.get("FT_TEST_COMPILE_CACHE", "1") != "0":
        cache = os.environ.get(_SHARED) if os.environ.get("PYTEST_XDIST_WORKER") else None
        if cache is None:
            cache = _CACHE = tempfile.mkdtemp(prefix="ft-test-xla-cache-")
            os.environ[_SHARED] = cache  # inherited by the workers pytest-xdist starts next
        settings = {"jax_compilation_cache_dir": cache, **_CACHE_SETTINGS}
        for name, value in settings.items():
            jax.config.update(name, value)
        settings["jax_compilation_cache_max_size"] = _CHILD_CACHE_LIMIT
        os.environ.update({name.upper(): str(value) for name, value in settings.items()})
        jax.config.update("jax_compilation_cache_max_size", -1)  # whatever it read at import


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session):
    """Collect the garbage once, then freeze what is left. After this hook pytest collects five
    more times, each a full pass over a heap that grew with every test (~1 s late in a session),
    and a pytest-xdist worker still busy 5 s after the run ends is sent SIGINT: a
    KeyboardInterrupt traceback printed after a green run."""
    gc.collect()
    gc.freeze()


def pytest_unconfigure(config):
    if _CACHE is not None:
        shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
