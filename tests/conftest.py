"""Session settings (malloc, a fresh compilation cache) and fixtures; helpers are in helpers.py."""

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
# FT_TEST_COMPILE_CACHE=0 turns it off. Made in a hook, not at import, so that one directory is
# made per process and removed at its end.
_CACHE = None


def pytest_configure(config):
    global _CACHE
    if os.environ.get("FT_TEST_COMPILE_CACHE", "1") != "0":
        _CACHE = tempfile.mkdtemp(prefix="ft-test-xla-cache-")
        jax.config.update("jax_compilation_cache_dir", _CACHE)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


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
