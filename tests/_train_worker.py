"""Subprocess entry points for tests/test_train.py (device counts, jax.distributed and signals need a fresh
process). ``python tests/_train_worker.py MODE OUT_JSON [key=value ...]``; XLA_FLAGS is set by the parent.

Modes:
  run      train(cfg); env SGT_TEST_BLOCK_AFTER=N: after step N (its checkpoint done) touch OUT_JSON.blocked
           and sleep until killed.
  main     sgt_jax.train.main(overrides) with env SGT_TEST_SIGTERM_AT=k: on_step(k) sends SIGTERM to itself;
           the exit code is main()'s.
  gloo     like run, for the two-process test (the package enables gloo CPU collectives itself).
  sharded  the HLO of the accumulation step (data=4, fsdp=2, accum 4), then one short run per mesh in
           SGT_TEST_MESHES ("data,fsdp,tensor,accum;..."), run dirs <run_dir>_<i>.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path


def _summary_json(summary):
    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in summary.items()}


def _load(overrides):
    from sgt_jax import config as config_lib

    return config_lib.load_config(None, list(overrides))


def mode_run(out, overrides):
    from sgt_jax.train import train

    block_after = os.environ.get("SGT_TEST_BLOCK_AFTER")

    def on_step(step, state):
        if block_after is not None and step == int(block_after):
            Path(str(out) + ".blocked").write_text(str(step))
            while True:  # the parent SIGKILLs us here
                time.sleep(0.1)

    summary = train(_load(overrides), on_step=on_step)
    Path(out).write_text(json.dumps(_summary_json(summary)))


def mode_main(out, overrides):
    import sgt_jax.train as train_mod

    sigterm_at = int(os.environ["SGT_TEST_SIGTERM_AT"])
    original = train_mod.train
    seen = {}

    def on_step(step, state):
        if step == sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)

    def train_with_hook(cfg, **kwargs):
        summary = original(cfg, on_step=on_step, **kwargs)
        seen.update(summary)
        return summary

    train_mod.train = train_with_hook
    # The same settings as the other modes: the schema defaults plus the overrides (an empty YAML file),
    # not main()'s embedded tiny default.
    schema_defaults = Path(str(out) + ".defaults.yaml")
    schema_defaults.write_text("{}\n")
    code = train_mod.main(["--config", str(schema_defaults), *overrides])
    Path(out).write_text(json.dumps(_summary_json(seen)))
    sys.exit(code)


def mode_gloo(out, overrides):
    # sgt_jax.training.parallel.maybe_initialize_distributed selects gloo CPU collectives itself (what this mode checks).
    from sgt_jax.train import train

    summary = train(_load(overrides))
    Path(out).write_text(json.dumps(_summary_json(summary)))


# ------------------------------------------------------------------------------------------------ HLO

_COLLECTIVE = re.compile(r"\b(all-reduce|all-reduce-start|reduce-scatter|all-gather|all-gather-start|all-to-all|"
                         r"collective-permute|collective-permute-start)\(")
_CALLED = re.compile(r"(?:body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_SHAPE = re.compile(r"\b[a-z]+\d*\[([\d,]*)\]")


def parse_hlo(text):
    """{computation name: [instruction lines]} and the entry computation's name."""
    comps, entry, current = {}, None, None
    for line in text.splitlines():
        header = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if header and not line.startswith(" "):
            current = header.group(2)
            comps[current] = []
            if header.group(1):
                entry = current
        elif line.startswith("}"):
            current = None
        elif current is not None and line.strip():
            comps[current].append(line.strip())
    return comps, entry


def called_from(lines):
    names = []
    for line in lines:
        names += _CALLED.findall(line)
        for group in _BRANCHES.findall(line):
            names += [n.strip().lstrip("%") for n in group.split(",") if n.strip()]
    return names


def closure(comps, roots):
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        todo += called_from(comps[name])
    return seen


def elements(type_text):
    total = 0
    for dims in _SHAPE.findall(type_text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n
    return total


def analyse_step_hlo(text):
    comps, entry = parse_hlo(text)
    while_bodies = [m for lines in comps.values() for line in lines if " while(" in line
                    for m in re.findall(r"body=%?([\w.\-]+)", line)]
    inside = closure(comps, while_bodies)
    outside = closure(comps, [entry]) - inside
    collectives_inside = [f"{c}: {line[:160]}" for c in sorted(inside) for line in comps[c] if _COLLECTIVE.search(line)]
    all_reduces_outside = []
    for c in sorted(outside):
        for line in comps[c]:
            m = re.match(r"%?[\w.\-]+\s*=\s*(.*?)\s(all-reduce|all-reduce-start)\(", line)
            if m:
                all_reduces_outside.append(elements(m.group(1)))
    other_outside = [line[:160] for c in sorted(outside) for line in comps[c]
                     if _COLLECTIVE.search(line) and not re.search(r"\ball-reduce(-start)?\(", line)]
    return {
        "num_while": len(while_bodies),
        "collectives_inside_while": collectives_inside,
        "all_reduce_elements_outside": all_reduces_outside,
        "other_collectives_outside": other_outside,
    }


def mode_sharded(out, overrides):
    import jax
    import numpy as np

    from sgt_jax.tracking import read_events
    from sgt_jax.train import train
    from sgt_jax.training.trainer import Trainer

    result = {"devices": jax.device_count()}
    # data.batch_size is the micro-batch: 8 rows, one per device, 4 of them per optimizer step.
    cfg = _load(list(overrides) + ["mesh.data=4", "mesh.fsdp=2", "mesh.tensor=1", "optimizer.grad_accum_steps=4",
                                   "data.batch_size=8"])
    trainer = Trainer(cfg)
    host_batch = next(iter(trainer.train_data))
    batch = trainer.global_batch(host_batch, 4)
    state = trainer.init_state()
    compiled = trainer.jitted_train_step.lower(state, trainer.base_state, batch).compile()
    text = compiled.as_text()
    result["hlo"] = analyse_step_hlo(text)
    result["num_params"] = int(sum(np.size(x) for x in jax.tree.leaves(state.params)))
    # Elements of one device's shard of each parameter (the train state's fsdp sharding).
    result["num_param_shard_elements"] = int(sum(np.prod(x.sharding.shard_shape(x.shape))
                                                 for x in jax.tree.leaves(state.params)))
    result["num_param_leaves"] = len(jax.tree.leaves(state.params))
    _, metrics = jax.eval_shape(trainer.jitted_train_step, state, trainer.base_state, batch)
    result["num_metric_elements"] = int(sum(np.prod(m.shape, dtype=int) for m in jax.tree.leaves(metrics)))
    Path(str(out) + ".hlo.txt").write_text(text)
    del trainer, state, compiled

    run_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("tracking.run_dir="))
    runs = []
    for i, spec in enumerate(filter(None, os.environ.get("SGT_TEST_MESHES", "").split(";"))):
        data, fsdp, tensor, accum = spec.split(",")
        this_dir = f"{run_dir}_{i}"
        # The same examples per optimizer step as the reference: micro-batches of batch_size / accum.
        step_batch = int(next(o.split("=", 1)[1] for o in overrides if o.startswith("data.batch_size=")))
        run_cfg = _load(list(overrides) + [f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}",
                                           f"optimizer.grad_accum_steps={accum}", f"tracking.run_dir={this_dir}",
                                           f"data.batch_size={step_batch // int(accum)}"])
        train(run_cfg)
        events = read_events(Path(this_dir) / "tensorboard")
        runs.append({"mesh": spec, "loss": events["train/loss"], "grad_norm": events["train/grad_norm"]})
    result["runs"] = runs
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    mode, out, *overrides = sys.argv[1:]
    {"run": mode_run, "main": mode_main, "gloo": mode_gloo, "sharded": mode_sharded}[mode](out, overrides)
