import json
import os
import platform
import subprocess
import sys

import jax
import pytest

from benchmarks.common import configure_malloc, malloc_note
from flax_transformer import TransformerConfig, runtime
from flax_transformer.runtime import (
    KEEP_FREED_MEMORY_ENV,
    accelerator_expected,
    keep_freed_memory,
)

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs glibc")


def child_stdout(code: str, jax_platforms: str = "cpu") -> str:
    """stdout of `python -c code` in a child (so this process keeps its malloc settings), run
    as on a machine whose JAX uses `jax_platforms`."""
    env = {**os.environ, "JAX_PLATFORMS": jax_platforms}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env=env).stdout


@glibc
def test_keep_freed_memory_is_accepted_by_glibc():
    code = "from flax_transformer.runtime import keep_freed_memory; print(keep_freed_memory())"
    assert child_stdout(code).strip() == "True"


# Allocates 3 GiB from the heap (untouched, so no memory is used), frees it, and prints how
# far the heap grew and how much of that it gave back: glibc trims a free top larger than
# M_TRIM_THRESHOLD.
HEAP_AFTER_FREE = """
import ctypes
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
{setup}
start = libc.sbrk(0)
chunks = [libc.malloc(96 << 20) for _ in range(32)]
grown = libc.sbrk(0)
for chunk in reversed(chunks):
    libc.free(chunk)
print(grown - start, grown - libc.sbrk(0))
"""


@glibc
@pytest.mark.parametrize("how", ["mallopt", "environment"])
def test_freed_memory_is_kept_even_above_2_gib(how):
    """Two `base` models in one benchmark process free > 2 GiB at the heap's top per step;
    a trim threshold of 2**31 - 1 gave it back and every step faulted it in again."""
    setup = ("from flax_transformer.runtime import keep_freed_memory\n"
             "assert keep_freed_memory()" if how == "mallopt" else "")
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           **(KEEP_FREED_MEMORY_ENV if how == "environment" else {})}
    out = subprocess.run([sys.executable, "-c", HEAP_AFTER_FREE.format(setup=setup)],
                         capture_output=True, text=True, check=True, env=env).stdout
    grown, given_back = map(int, out.split())
    assert grown > 2 << 30
    assert given_back == 0


def test_child_environment_carries_the_same_settings(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
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
    env = json.loads(child_stdout(code))
    assert {k: env[k] for k in KEEP_FREED_MEMORY_ENV} == KEEP_FREED_MEMORY_ENV


@pytest.mark.parametrize("platforms, expected", [
    ("cpu", False), ("CPU", False), ("cpu,cuda", False), ("cuda", True), ("cuda,cpu", True),
    ("tpu", True), ("rocm", True),
])
def test_jax_platforms_decides_whether_an_accelerator_is_expected(monkeypatch, platforms,
                                                                  expected):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert accelerator_expected() is expected


def test_an_installed_jax_plugin_means_an_accelerator(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.delitem(sys.modules, "jax_plugins", raising=False)
    (tmp_path / "jax_plugins" / "xla_fake_gpu").mkdir(parents=True)
    (tmp_path / "jax_plugins" / "xla_fake_gpu" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert accelerator_expected()
    monkeypatch.delitem(sys.modules, "jax_plugins", raising=False)


def test_keep_freed_memory_leaves_malloc_alone_on_an_accelerator(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert keep_freed_memory() is False  # returns before touching malloc
    assert configure_malloc(default_malloc=False) == dict(os.environ)
    assert "accelerator" in malloc_note(False)


@glibc
def test_keep_freed_memory_can_be_forced_on_an_accelerator():
    code = ("from flax_transformer.runtime import keep_freed_memory; "
            "print(keep_freed_memory(), keep_freed_memory(on_accelerator=True))")
    assert child_stdout(code, jax_platforms="cuda").split() == ["False", "True"]


@pytest.mark.parametrize("backend, flags, expected", [
    ("gpu", set(), "bfloat16"),
    ("tpu", set(), "bfloat16"),
    ("cpu", {"avx2", "fma"}, "float32"),  # bf16 products emulated: float32 is faster
    ("cpu", {"avx512f", "avx512_bf16"}, "bfloat16"),  # Zen 4, Cooper Lake
    ("cpu", {"avx512f", "amx_bf16", "amx_tile"}, "bfloat16"),  # Sapphire Rapids
])
def test_native_compute_dtype(backend, flags, expected):
    assert runtime.native_compute_dtype(backend, flags) == expected


def test_cpu_flags_reads_the_flags_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 amx_bf16\n\n"
                       "processor\t: 1\nflags\t\t: fpu sse2 amx_bf16\n")
    assert runtime.cpu_flags(str(cpuinfo)) == {"fpu", "sse2", "amx_bf16"}
    assert runtime.cpu_flags(str(tmp_path / "absent")) == set()


def test_auto_dtype_is_resolved_when_the_config_is_built(monkeypatch):
    """dtype="auto" never reaches a model or a saved config: it becomes the machine's pick."""
    assert TransformerConfig(dtype="auto").dtype == runtime.native_compute_dtype()
    for flags, expected in (({"amx_bf16"}, "bfloat16"), ({"avx2"}, "float32")):
        monkeypatch.setattr(runtime, "cpu_flags", lambda flags=flags: flags)
        monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
        config = TransformerConfig.preset("tiny", dtype="auto")
        assert config.dtype == expected and config.to_dict()["dtype"] == expected
        assert TransformerConfig.from_dict(config.to_dict()) == config
