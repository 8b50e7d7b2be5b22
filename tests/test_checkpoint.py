"""Checkpoint policies (Orbax's), round trips, completeness, compatibility and the preemption guard."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sgt_jax.training.checkpoint import (
    CheckpointError,
    Checkpointer,
    PreemptionGuard,
    check_compatible,
)
from sgt_jax.config import CheckpointConfig, SGTConfig, to_dict

REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_state(seed: int = 0):
    params = {"w": jnp.arange(6.0).reshape(2, 3) + seed, "b": jnp.full((3,), 0.5 + seed)}
    tx = optax.adamw(1e-3, weight_decay=0.1)
    opt_state = tx.init(params)
    grads = jax.tree_util.tree_map(lambda p: jnp.sin(p) + 1.0, params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-trivial mu/nu/count
    return {
        "params": params,
        "opt_state": opt_state,
        "step": jnp.asarray(seed + 7, jnp.int32),
        "run_key": jax.random.key_data(jax.random.fold_in(jax.random.key(42), seed)),  # as the trainer keeps it
    }


def abstract_of(state):
    device = jax.devices()[0]
    return jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=jax.sharding.SingleDeviceSharding(device)),
        jax.eval_shape(lambda: state),
    )


def assert_bitwise_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


CONFIG = to_dict(SGTConfig())


# ---------------------------------------------------------------------------------------------- policy


def test_step_interval_policy(tmp_path):
    clock = FakeClock()
    ckpt = Checkpointer(tmp_path, every_minutes=30.0, every_steps=5, async_save=False, clock=clock)
    assert [s for s in range(1, 16) if ckpt.save_due(s)] == [5, 10, 15]
    ckpt.close()


def test_time_interval_policy(tmp_path):
    clock = FakeClock()
    ckpt = Checkpointer(tmp_path, every_minutes=2.0, every_steps=None, async_save=False, clock=clock)
    assert not ckpt.save_due(1)
    clock.t += 119.0
    assert not ckpt.save_due(2)
    clock.t += 1.0  # 2 minutes since start
    assert ckpt.save_due(3)
    ckpt.save(3, make_state(), data_state={"pos": 3}, config=CONFIG)
    assert not ckpt.save_due(4)  # the interval restarts at the save
    clock.t += 100.0
    assert not ckpt.save_due(5)
    clock.t += 20.0
    assert ckpt.save_due(6)
    ckpt.close()


def test_orbax_policy_decides_steps_time_preemption_and_never_goes_back(tmp_path, monkeypatch):
    """One Orbax policy: the step interval and the time interval (on the injected clock, restarted by
    every save) both count, JAX's preemption sync point forces a save off both intervals, and no save is
    due at or below the latest saved step. Fails if one of the three is ignored, if time is read from the
    real clock, or if a step below the last checkpoint is saved again."""
    from jax.experimental import multihost_utils

    clock = FakeClock()
    preempt_at = {7}
    # Orbax asks JAX's preemption sync service (unavailable on one process): stand in for the cluster.
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: step in preempt_at)
    ckpt = Checkpointer(tmp_path, every_minutes=2.0, every_steps=5, async_save=False, clock=clock)
    saved = []
    for step in range(1, 17):  # 30 simulated seconds per step
        if ckpt.save_due(step):
            saved.append(step)
            ckpt.save(step, make_state(), data_state={"s": step}, config=CONFIG)
        clock.t += 30.0
    # 5, 10, 15 by steps; 7 by preemption; 14 four steps (2 minutes) after the save of 10 (and not 9:
    # the save of 7 restarted the interval).
    assert saved == [5, 7, 10, 14, 15]
    assert not ckpt.save_due(10) and not ckpt.save_due(15)  # multiples of 5, but not after the latest
    clock.t += 600.0
    assert ckpt.save_due(16) and not ckpt.save_due(12)
    ckpt.close()


TWO_HOSTS_TIME_POLICY = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {repo!r})
    import jax, numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes=2, process_id={pid})
    from sgt_jax.training.checkpoint import Checkpointer

    now = [0.0]
    ckpt = Checkpointer({directory!r}, every_minutes=2.0, every_steps=5, async_save=False, clock=lambda: now[0])
    saved = []
    for step in range(1, 9):
        if ckpt.save_due(step):
            saved.append(step)
            ckpt.save(step, {{"w": np.full((4,), step, np.float32)}}, data_state={{"s": step}}, config={{}})
        now[0] += {minutes_per_step} * 60.0
    print("SAVED", json.dumps(saved), "COMPLETE", json.dumps(ckpt.complete_steps()), flush=True)
    ckpt.close()
    """
)


def test_time_based_saves_follow_the_primary_host_on_every_host(tmp_path):
    """Two processes whose clocks disagree (process 0: a minute per step; process 1: stopped) save at the
    same steps: 5 by the step interval, and 3 and 7 because process 0's clock says two minutes passed, which
    Orbax decides on the primary host and broadcasts. Fails (different lists, or a hang in the collective
    save) if each host decided on its own clock."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [subprocess.Popen([sys.executable, "-c", TWO_HOSTS_TIME_POLICY.format(
        repo=str(REPO), port=port, pid=pid, directory=str(tmp_path / "ckpt"), minutes_per_step=1 - pid)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True) for pid in (0, 1)]
    try:
        outputs = [proc.communicate(timeout=180) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
        assert out.strip().splitlines()[-1] == "SAVED [3, 5, 7] COMPLETE [3, 5, 7]", out


def test_from_config_uses_run_dir(tmp_path):
    cfg = CheckpointConfig(every_minutes=5.0, every_steps=4, keep=2, async_save=False)
    ckpt = Checkpointer.from_config(cfg, tmp_path / "run")
    assert ckpt.directory == str((tmp_path / "run" / "checkpoints").resolve())
    assert (ckpt.every_minutes, ckpt.every_steps, ckpt.keep, ckpt.async_save) == (5.0, 4, 2, False)
    ckpt.close()


# ---------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("async_save", [False, True])
def test_round_trip_bitwise(tmp_path, async_save):
    state = make_state(1)
    data_state = {"version": 1, "batch_index": 8, "fingerprint": "0123abcd"}
    ckpt = Checkpointer(tmp_path, every_minutes=30.0, async_save=async_save)
    assert ckpt.save(8, state, data_state=data_state, config=CONFIG)
    ckpt.wait()
    assert ckpt.latest_step() == 8
    ckpt.close()

    # A fresh process-level view (new manager), as on resume.
    resumed = Checkpointer(tmp_path, every_minutes=30.0)
    restored, restored_data, restored_config = resumed.restore(abstract_state=abstract_of(state))
    assert_bitwise_equal(restored, state)
    assert type(restored["opt_state"][0]).__name__ == "ScaleByAdamState"
    assert restored_data == data_state
    assert restored_config == CONFIG
    assert restored["params"]["w"].sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])
    resumed.close()


def test_dict_data_state_round_trip(tmp_path):
    ckpt = Checkpointer(tmp_path, every_minutes=30.0, async_save=False)
    ckpt.save(1, make_state(), data_state={"epoch": 2, "index": 17}, config={"k": [1, 2]})
    _, data_state, config = ckpt.restore(1, abstract_state=abstract_of(make_state()))
    assert data_state == {"epoch": 2, "index": 17} and config == {"k": [1, 2]}
    ckpt.close()


def test_keep_last_n(tmp_path):
    ckpt = Checkpointer(tmp_path, every_minutes=30.0, keep=2, async_save=True)
    for step in (1, 2, 3, 4):
        ckpt.save(step, make_state(step), data_state={"s": step}, config=CONFIG)
    ckpt.wait()
    assert ckpt.complete_steps() == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["3", "4"]
    restored, data_state, _ = ckpt.restore(3, abstract_state=abstract_of(make_state()))
    assert_bitwise_equal(restored, make_state(3))
    assert data_state == {"s": 3}
    ckpt.close()


def test_restore_without_checkpoint_is_a_clear_error(tmp_path):
    ckpt = Checkpointer(tmp_path, every_minutes=30.0)
    assert ckpt.latest_step() is None
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        ckpt.restore(abstract_state=abstract_of(make_state()))
    ckpt.close()


# ---------------------------------------------------------------------------------------------- completeness

KILLED_MID_SAVE = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {repo!r})
    import jax, jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from sgt_jax.training.checkpoint import Checkpointer

    ckpt = Checkpointer({directory!r}, every_minutes=30.0, async_save=True)
    ckpt.save(1, {{"w": jnp.zeros((256, 256))}}, data_state={{"s": 1}}, config={{}})
    ckpt.wait()

    async def hang(self):  # every byte of step 2 is written; the rename/commit never happens
        print("FINALIZING", flush=True)
        time.sleep(120)

    atomicity.AtomicRenameTemporaryPath.finalize = hang
    atomicity.CommitFileTemporaryPath.finalize = hang
    ckpt.save(2, {{"w": jnp.ones((256, 256))}}, data_state={{"s": 2}}, config={{}})
    ckpt.wait()
    """
)


def test_killed_mid_save_resumes_from_previous_complete_step(tmp_path):
    directory = tmp_path / "ckpt"
    script = KILLED_MID_SAVE.format(repo=str(REPO), directory=str(directory))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=env, text=True)
    try:
        line = proc.stdout.readline()  # blocks until the save of step 2 reaches finalize
        assert line.strip() == "FINALIZING", "subprocess failed before reaching finalize"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    names = sorted(p.name for p in directory.iterdir())
    assert "1" in names and "2" not in names
    assert any(n.startswith("2.") and "orbax-checkpoint-tmp" in n for n in names), names

    ckpt = Checkpointer(directory, every_minutes=30.0)
    assert ckpt.latest_step() == 1
    state, data_state, _ = ckpt.restore(abstract_state=abstract_of({"w": jnp.ones((256, 256))}))
    assert data_state == {"s": 1}
    np.testing.assert_array_equal(state["w"], np.zeros((256, 256)))
    # The run goes on and saves step 2 for real over the debris.
    ckpt.save(2, {"w": jnp.ones((256, 256))}, data_state={"s": 2}, config={})
    ckpt.wait()
    assert ckpt.latest_step() == 2
    ckpt.close()


def test_half_written_step_is_never_restored(tmp_path, monkeypatch):
    """A save whose finalization (Orbax's rename to the step's name) never happens leaves its bytes under a
    temporary name: the next run's Checkpointer neither lists nor restores it, restores the step before, and
    saves the step again over the debris. Fails if unfinalized steps count as complete."""
    from orbax.checkpoint._src.path import atomicity

    ckpt = Checkpointer(tmp_path, every_minutes=30.0, async_save=True)
    ckpt.save(1, make_state(1), data_state={"s": 1}, config=CONFIG)
    ckpt.wait()

    async def lost(self, *args, **kwargs):
        raise OSError("the file system went away before the rename")

    with monkeypatch.context() as patch:
        patch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", lost)
        ckpt.save(2, make_state(2), data_state={"s": 2}, config=CONFIG)
        with pytest.raises(OSError, match="went away"):
            ckpt.wait()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "2" not in names and any(n.startswith("2.") and "orbax-checkpoint-tmp" in n for n in names), names

    resumed = Checkpointer(tmp_path, every_minutes=30.0, async_save=False)
    assert resumed.complete_steps() == [1]
    restored, data_state, _ = resumed.restore(abstract_state=abstract_of(make_state()))
    assert_bitwise_equal(restored, make_state(1))
    assert data_state == {"s": 1}
    with pytest.raises(CheckpointError, match="step 2 has no complete checkpoint"):
        resumed.restore(2, abstract_state=abstract_of(make_state()))
    assert resumed.save(2, make_state(5), data_state={"s": 5}, config=CONFIG)
    assert resumed.latest_step() == 2
    assert resumed.restore(abstract_state=abstract_of(make_state()))[1] == {"s": 5}
    resumed.close()


def test_saving_a_complete_step_again_is_skipped_unless_forced(tmp_path):
    ckpt = Checkpointer(tmp_path, every_minutes=30.0, async_save=False)
    assert ckpt.save(3, make_state(1), data_state={"s": 1}, config=CONFIG)
    assert not ckpt.save(3, make_state(2), data_state={"s": 2}, config=CONFIG)
    assert ckpt.restore(abstract_state=abstract_of(make_state()))[1] == {"s": 1}
    assert ckpt.save(3, make_state(2), data_state={"s": 2}, config=CONFIG, force=True)
    assert ckpt.restore(abstract_state=abstract_of(make_state()))[1] == {"s": 2}
    ckpt.close()


# ---------------------------------------------------------------------------------------------- compatibility


def _changed(**dotted):
    cfg = to_dict(SGTConfig())
    for key, value in dotted.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return cfg


@pytest.mark.parametrize(
    "change, setting",
    [
        ({"model__path": "/models/llama-3-8b"}, "model.path"),
        ({"cloak__estimator_kwargs": {"num_hidden_layers": 2}}, "cloak.estimator_kwargs"),
        ({"cloak__mean_num_experts": 4}, "cloak.mean_num_experts"),
        ({"cloak__directly_learn_stds": False}, "cloak.directly_learn_stds"),
        ({"cloak__scale": [1e-4, 1.0]}, "cloak.scale"),
    ],
)
def test_incompatible_resume_is_refused(change, setting):
    with pytest.raises(CheckpointError) as info:
        check_compatible(to_dict(SGTConfig()), _changed(**change))
    message = str(info.value)
    assert setting in message and "run directory" in message and "\n" not in message


def test_resume_may_change_training_settings():
    current = _changed(optimizer__learning_rate=1e-4, train__max_steps=99, tracking__wandb=True,
                       validation__every_steps=7, checkpoint__every_minutes=1.0, checkpoint__every_steps=3)
    check_compatible(to_dict(SGTConfig()), current)
    # JSON round trip (tuples -> lists) and an explicit config_path equal to model.path are no change.
    saved = _changed(cloak__scale=(1e-8, 1.0))
    check_compatible(saved, _changed(cloak__scale=[1e-8, 1.0]))
    check_compatible(to_dict(SGTConfig()), _changed(cloak__config_path=SGTConfig().model.path))


def test_base_model_fingerprint_is_checked_when_present():
    saved, current = dict(CONFIG, base_model_fingerprint="abc"), dict(CONFIG, base_model_fingerprint="def")
    with pytest.raises(CheckpointError, match="base_model_fingerprint"):
        check_compatible(saved, current)


# ---------------------------------------------------------------------------------------------- preemption


def test_preemption_guard_catches_sigterm_and_restores_handlers():
    previous_term = signal.getsignal(signal.SIGTERM)
    previous_int = signal.getsignal(signal.SIGINT)
    with PreemptionGuard() as guard:
        assert not guard.requested and not guard.stop_requested(0)
        os.kill(os.getpid(), signal.SIGTERM)  # would kill the test process without the guard
        assert guard.requested and guard.stop_requested(1)
        assert guard.signal_received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is previous_term
    assert signal.getsignal(signal.SIGINT) is previous_int


def test_preemption_guard_sigint_twice_interrupts():
    with PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


# ---------------------------------------------------------------------------------------------- sharding

SHARDED_RESTORE = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {repo!r})
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from sgt_jax.training.checkpoint import Checkpointer

    assert jax.device_count() == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "fsdp"))
    keys = jax.random.key_data(jax.random.split(jax.random.key(7), 4))
    state = {{
        "w": jax.device_put(jnp.arange(32.0).reshape(8, 4), NamedSharding(mesh, P("fsdp", None))),
        "run_key": jax.device_put(jax.random.key_data(jax.random.key(3)), NamedSharding(mesh, P())),
        "keys": jax.device_put(keys, NamedSharding(mesh, P("data"))),
    }}
    ckpt = Checkpointer({directory!r}, every_minutes=30.0)
    ckpt.save(1, state, data_state={{}}, config={{}})
    ckpt.wait()

    # Restore onto a different layout than the one saved.
    target = {{
        "w": NamedSharding(mesh, P(None, ("data", "fsdp"))),
        "run_key": NamedSharding(mesh, P()),
        "keys": NamedSharding(mesh, P("fsdp")),
    }}
    abstract = {{k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=target[k]) for k, v in state.items()}}
    restored, _, _ = ckpt.restore(abstract_state=abstract)
    for k in state:
        assert restored[k].sharding == target[k], (k, restored[k].sharding)
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert len(restored["w"].addressable_shards) == 4 and restored["w"].addressable_shards[0].data.shape == (8, 1)
    np.testing.assert_array_equal(restored["run_key"], state["run_key"])
    np.testing.assert_array_equal(restored["keys"], keys)
    ckpt.close()
    print("OK")
    """
)


def test_restore_lands_sharded_on_a_mesh(tmp_path):
    script = SHARDED_RESTORE.format(repo=str(REPO), directory=str(tmp_path / "ckpt"))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]
