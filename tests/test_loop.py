"""The training loop's schedule (sgt_jax.training.loop): hooks fire on their step or time cadence, stops end
the loop in registration order, and on several hosts every host fires the same hooks at the same steps.

Hosts are simulated by threads joined in a barrier-based OR, the same contract as parallel.agree's
all-gather; the real multi-process runs are in test_multihost.py. No model, no jit: fast."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

from sgt_jax.training import loop


def info(step, **kwargs):
    return loop.StepInfo(step=step, state=None, metrics={}, batch={}, data_state=None, **kwargs)


def fired_steps(schedule, steps, **info_kwargs):
    """Drive ``schedule`` through ``steps``; returns the step at which it stopped (None if it did not)."""
    for step in steps:
        stopped = schedule.after_step(info(step, **info_kwargs))
        if stopped is not None:
            return step, stopped
    return None


def test_a_hook_every_3_steps_fires_at_multiples_of_3_and_the_final_step():
    """every=3 over steps 1..10 fires at 3, 6, 9; a Cadence with final_step=10 also at 10. Fails if the
    cadence is off by one, fires every step, or ignores final_step."""
    calls = {"every3": [], "logged": []}
    schedule = loop.Schedule()
    schedule.add("every3", lambda i: calls["every3"].append(i.step), every=3)
    schedule.add("logged", lambda i: calls["logged"].append(i.step), every=loop.Cadence(4, final_step=10))
    assert fired_steps(schedule, range(1, 11)) is None
    assert calls == {"every3": [3, 6, 9], "logged": [4, 8, 10]}


def test_a_time_based_hook_fires_once_the_clock_passes_its_interval_and_restarts():
    """every_minutes=2 on an injected clock: not due at 119 s, due at 120 s, then not again until 120 s after
    it fired (the interval restarts when the hook runs, not when it was due). Fails if the real clock is
    used, the interval is in seconds, or the cadence never resets."""
    now = [0.0]
    fired = []
    schedule = loop.Schedule()
    schedule.add("validate", lambda i: fired.append((i.step, now[0])),
                 every=loop.Cadence(every_minutes=2, clock=lambda: now[0]))
    for step, t in enumerate([30.0, 119.0, 120.0, 200.0, 239.0, 240.0, 500.0], start=1):
        now[0] = t
        schedule.after_step(info(step))
    assert fired == [(3, 120.0), (6, 240.0), (7, 500.0)]


def test_stops_end_the_loop_in_registration_order():
    """Hooks before a due stop run, the stop's ``then`` runs, hooks after it do not; an entry that is never
    due never runs. Fails if the order is not the registration order or a stop lets later hooks run."""
    ran = []
    schedule = loop.Schedule()
    schedule.add("before", lambda i: ran.append(("before", i.step)), every=1)
    schedule.stop_when("exhausted", lambda i: i.exhausted, then=lambda i: ran.append(("then", i.step)))
    schedule.add("after", lambda i: ran.append(("after", i.step)), every=1)
    assert schedule.after_step(info(1)) is None
    assert schedule.after_step(info(2, exhausted=True)) == "exhausted"
    assert ran == [("before", 1), ("after", 1), ("before", 2), ("then", 2)]
    assert schedule.names == ["before", "exhausted", "after"]
    with pytest.raises(ValueError):
        schedule.add("before", lambda i: None, every=2)
    with pytest.raises(ValueError):
        schedule.add("neither", lambda i: None)


class SimulatedHosts:
    """``agree`` for N threads: each posts its flags, all wait, each gets the OR of all (like parallel.agree)."""

    def __init__(self, n):
        self.posted = [None] * n
        self.barrier = threading.Barrier(n, timeout=10)

    def agree_for(self, host):
        def agree(flags):
            self.posted[host] = dict(flags)
            self.barrier.wait()
            agreed = {k: any(p[k] for p in self.posted) for k in flags}
            self.barrier.wait()  # nobody posts the next step's flags before everyone has read these
            return agreed

        return agree


def test_time_cadence_and_a_one_host_stop_are_the_same_on_every_host():
    """Two simulated hosts: host 1's clock runs 10x fast, so only its local view says "validate" by time;
    a stop condition holds on host 0 alone at step 7. Both hosts validate at the same steps, and both
    stop at step 7, at the same point in the schedule. Fails if a host acts on its own view (host 0 would
    never validate, host 1 would not stop, and a real run would hang in a collective only one host
    entered)."""
    hosts = SimulatedHosts(2)
    results = [None, None]

    def host(rank):
        step_seconds = 10.0 if rank == 0 else 100.0  # host 1: ten times the simulated time per step
        now = [0.0]
        validated = []
        schedule = loop.Schedule(agree=hosts.agree_for(rank))
        schedule.add("validate", lambda i: validated.append(i.step),
                     every=loop.Cadence(every_steps=None, every_minutes=5, clock=lambda: now[0]))
        schedule.stop_when("preempted", lambda i: rank == 0 and i.step == 7)
        schedule.add("on_step", lambda i: now.__setitem__(0, now[0] + step_seconds), every=1)
        results[rank] = (fired_steps(schedule, range(1, 20)), validated)

    threads = [threading.Thread(target=host, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert results[0] is not None and results[1] is not None, "a simulated host hung"
    (stop0, val0), (stop1, val1) = results
    assert stop0 == stop1 == (7, "preempted")
    # Host 1 passes 300 s every 3 steps (clock 300 at step 4's decision, restarting after each validation).
    assert val0 == val1 == [4, 7], (val0, val1)


def test_training_schedule_runs_the_cadences_and_stops_in_their_order(tmp_path):
    """The run's schedule with stand-ins for the trainer, checkpointer, guard and tracker: logs on
    tracking.log_every_steps and the last step, saves when the checkpointer's policy says so (with the
    step's data position), validates before a preemption stop but does not save on that step (the caller
    forces that save) nor call on_step, and stops "finished" after on_step once the data is exhausted.
    Fails if an entry is missing or a cadence moved in the order the SIGTERM and time-based checkpoint tests
    rely on."""
    from sgt_jax import config as config_lib

    cfg = config_lib.load_config(None, ["tracking.log_every_steps=2", "tracking.histogram_every_steps=3",
                                        "validation.every_steps=2", "validation.every_minutes=null",
                                        "train.max_nonfinite_steps=3", f"tracking.run_dir={tmp_path}"])
    events = []
    trainer = SimpleNamespace(
        cfg=cfg, total_steps=5, val_data=object(), saved_config={"c": 1},
        validate=lambda state, *, step, tracker: events.append(("validate", step)),
        weight_histograms=lambda state: {"w": np.zeros(2)})
    tracker = SimpleNamespace(scalars=lambda step, values: events.append(("log", step)),
                              histograms=lambda step, values: events.append(("histograms", step)))
    checkpointer = SimpleNamespace(save_due=lambda step: step in (2, 3, 4),
                                   save=lambda step, state, *, data_state, config: events.append(("save", step, data_state)))
    guard = SimpleNamespace(stop_requested=lambda step: step == 4)
    bar = SimpleNamespace(update=lambda step, **kw: None)
    schedule = loop.training_schedule(trainer, checkpointer=checkpointer, tracker=tracker, guard=guard, bar=bar,
                                      clock=lambda: 0.0, on_step=lambda step, state: events.append(("on_step", step)))

    def step_info(step, **kwargs):
        return loop.StepInfo(step, None, {"loss": np.float32(1.0)}, {"attention_mask": np.ones((2, 4))},
                             f"data@{step}", **kwargs)

    assert [schedule.after_step(step_info(s)) for s in (1, 2, 3)] == [None, None, None]
    assert schedule.after_step(step_info(4)) == "preempted"
    assert events == [("on_step", 1),
                      ("log", 2), ("validate", 2), ("save", 2, "data@2"), ("on_step", 2),
                      ("histograms", 3), ("save", 3, "data@3"), ("on_step", 3),
                      ("log", 4), ("validate", 4)]
    events.clear()
    assert schedule.after_step(step_info(5, exhausted=True)) == "finished"
    assert events == [("log", 5), ("on_step", 5)]  # the last step is logged off the cadence
    events.clear()
    # Non-finite losses stop before validation and saving (the last good checkpoint stays the latest).
    assert schedule.after_step(step_info(6, nonfinite_streak=3)) == "non-finite"
    assert events == [("log", 6), ("histograms", 6)]
