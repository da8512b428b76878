"""benchmarks/profile_train.py: HLO op counts and the reading of profiler traces."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks.profile_train import (
    NON_KERNEL_OPS,
    entry_op_counts,
    parse_args,
    profile,
    self_times,
    summarize_trace,
)


def test_entry_op_counts_counts_the_compiled_entry_computation():
    x = jnp.ones((8, 8))
    text = jax.jit(lambda x: jnp.sin(x) @ x.T + 1).lower(x).compile().as_text()
    ops = entry_op_counts(text)
    assert sum(ops.values()) >= 1
    assert not set(ops) & NON_KERNEL_OPS  # parameters, tuples... launch nothing
    with pytest.raises(ValueError, match="no ENTRY"):
        entry_op_counts("HloModule m\n")


def test_entry_op_counts_reads_opcodes_after_tuple_types():
    text = ("HloModule m\n\nENTRY %main (p: f32[2]) -> (f32[2], s32[]) {\n"
            "  %p = f32[2]{0} parameter(0)\n"
            "  %f = (f32[2]{0}, s32[]) fusion(f32[2]{0} %p), kind=kLoop, calls=%c\n"
            "  %g = f32[2]{0} get-tuple-element((f32[2]{0}, s32[]) %f), index=0\n"
            "  %d = f32[2]{0} custom-call(f32[2]{0} %g), custom_call_target=\"x\"\n"
            "  ROOT %t = (f32[2]{0}) tuple(f32[2]{0} %d)\n}\n\n%other {\n  %z = f32[] add()\n}\n")
    assert entry_op_counts(text) == {"fusion": 1, "custom-call": 1}


def _event(name, ts, dur, pid=1, tid=1):
    return dict(ph="X", name=name, ts=ts, dur=dur, pid=pid, tid=tid)


def test_self_times_subtract_nested_events():
    events = [_event("outer", 0, 100), _event("inner", 10, 30), _event("leaf", 15, 5),
              _event("inner", 50, 20), _event("next", 200, 7), _event("other thread", 0, 9, tid=2)]
    assert self_times(events) == {"outer": 50, "inner": 45, "leaf": 5, "next": 7,
                                  "other thread": 9}


def test_summarize_trace_splits_device_and_host_per_call():
    meta = [dict(ph="M", name="process_name", pid=1, args=dict(name="/host:CPU")),
            dict(ph="M", name="process_name", pid=2, args=dict(name="/device:GPU:0"))]
    device = [_event("kernel", ts, 3, pid=2) for ts in (100, 110, 300, 310)]
    host = [_event("Execute", 0, 90), _event("cuGraphLaunch", 10, 60),
            _event("$bench.py:1 run", 0, 400)]
    summary = summarize_trace(meta + device + host, calls=2)
    assert summary["device_ops"] == 2 and summary["device_busy_ms"] == pytest.approx(0.006)
    assert summary["device_span_ms"] == pytest.approx((313 - 100) / 2 / 1e3)
    assert summary["host_top"] == [("cuGraphLaunch", 0.03), ("Execute", 0.015)]  # no "$" frames


def test_profile_traces_a_jitted_function(tmp_path):
    f = jax.jit(lambda x: jnp.tanh(x @ x))
    x = jnp.ones((64, 64))
    summary, wall_ms = profile(lambda: f(x), steps=3, trace_dir=tmp_path / "trace")
    assert wall_ms > 0 and summary["host_top"]
    assert list((tmp_path / "trace").rglob("perfetto_trace.json.gz"))


def test_profile_train_refuses_bad_flags(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--attention-impl", "dense", "dense"])
    assert "lists an implementation twice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--steps", "0"])


@pytest.mark.parametrize("flags, expected", [([], False), (["--default-malloc"], True)])
def test_profile_train_sets_malloc_as_bench_train_does(monkeypatch, capsys, flags, expected):
    # A profile taken with glibc's defaults blames the ops that first write XLA's large
    # temporaries for the page faults (e.g. 69 instead of 4 ms for the loss's backward at base).
    from benchmarks import bench_train, common, profile_train

    seen = []
    monkeypatch.setattr(common, "configure_malloc", lambda default: seen.append(default))
    monkeypatch.setattr(bench_train, "make_runners", lambda spec, args: (None, 0, 0, {}))
    profile_train.main(["--configs", "small", *flags])
    assert seen == [expected]
    assert "| config | framework |" in capsys.readouterr().out
