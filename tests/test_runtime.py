import json
import os
import platform
import subprocess
import sys

import pytest

from benchmarks.common import configure_malloc, malloc_note
from flax_transformer.runtime import KEEP_FREED_MEMORY_ENV

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs glibc")


@glibc
def test_keep_freed_memory_is_accepted_by_glibc():
    # Run in a child so the test process keeps its own malloc settings.
    code = "from flax_transformer.runtime import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_child_environment_carries_the_same_settings():
    assert set(KEEP_FREED_MEMORY_ENV) == {"MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_",
                                          "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"}
    assert all(v.isdigit() for v in KEEP_FREED_MEMORY_ENV.values())
    assert configure_malloc(default_malloc=True) == dict(os.environ)
    assert "--default-malloc" in malloc_note(True)
    assert "keep_freed_memory" in malloc_note(False)


@glibc
def test_configure_malloc_hands_children_the_settings():
    code = ("import json; from benchmarks.common import configure_malloc; "
            "print(json.dumps(configure_malloc(False)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    env = json.loads(out.stdout)
    assert {k: env[k] for k in KEEP_FREED_MEMORY_ENV} == KEEP_FREED_MEMORY_ENV
