"""Data parallel training (training/parallel.py). The multi-device checks run in a child
process with two fake CPU devices (tests/multi_device.py); this process has one."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from flax_transformer.training import TrainingConfig
from flax_transformer.training.parallel import data_parallel

CHILD = Path(__file__).with_name("multi_device.py")


def _child(*args):
    env = dict(os.environ)
    # The child sets the device count itself; other flags (conftest.py's) pass on.
    env["XLA_FLAGS"] = " ".join(flag for flag in env.get("XLA_FLAGS", "").split()
                                if not flag.startswith("--xla_force_host_platform_device_count"))
    # The child imports this checkout's package even where it is not installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CHILD.parents[1]),
                                                      env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, str(CHILD), *args], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-4000:]
    return done


def test_one_device_trains_as_before_and_more_is_refused():
    local = len(jax.local_devices())
    assert (data_parallel(0, 64) is None) == (local == 1)  # one device: no parallelism
    assert data_parallel(1, 64) is None
    with pytest.raises(ValueError, match=rf"devices={local + 1} but this machine has {local}"):
        data_parallel(local + 1, 64)


def test_devices_field_is_a_non_negative_integer():
    assert TrainingConfig().devices == 0
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="devices must be a non-negative integer"):
            TrainingConfig(devices=bad)


def test_two_devices_compute_the_one_device_steps_and_runs_resume_on_any_count(tmp_path):
    _child(str(tmp_path))
    # A run trained on two devices is read in a process that has one (a GPU box's run
    # predicted on a laptop): its replicated arrays land on this process's device.
    from flax_transformer.training.runs import latest_state

    _, state, _, _ = latest_state(tmp_path / "two")
    assert int(state.step) == 4 and len(jax.devices()) == 1
