"""objective.adversary: the inverter learns inside the train step, its state resumes bitwise, and with the
adversary off the train state and the train step's HLO are today's."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import jax
import numpy as np
import pytest

STEPS = 6


def overrides(model_dir, run_dir, **extra):
    settings = {
        "model.path": model_dir, "model.dtype": "float32", "cloak.seed": 7, "train.seed": 0,
        "train.max_steps": STEPS, "data.batch_size": 8, "data.max_length": 64, "data.buckets": "[64]",
        "data.transform_all_tokens": "true", "data.synthetic_num_examples": 96, "data.num_workers": 0,
        "optimizer.warmup_steps": 0, "optimizer.schedule": "constant", "optimizer.learning_rate": 1e-3,
        "validation.every_steps": 1000, "validation.max_batches": 1, "validation.generation_examples": 0,
        "checkpoint.every_steps": 3, "checkpoint.every_minutes": "null", "checkpoint.async_save": "false",
        "tracking.log_every_steps": 1, "tracking.progress_bar": "false", "tracking.run_dir": run_dir,
        "objective.adversary": "mlp", "objective.adversary_learning_rate": 3e-3,
    }
    settings.update(extra)
    return [f"{k}={v}" for k, v in settings.items()]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from sgt_jax.testing import make_tiny_model_dir

    return str(make_tiny_model_dir(tmp_path_factory.mktemp("model") / "tiny", num_hidden_layers=2))


def _train(cfg, **kw):
    from sgt_jax.train import train

    with contextlib.redirect_stdout(io.StringIO()):
        return train(cfg, **kw)


def _final_state(run_dir, cfg):
    from sgt_jax.checkpoint import Checkpointer
    from sgt_jax.trainer import Trainer

    template = Trainer(cfg).init_state()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), template)
    with Checkpointer(Path(run_dir) / "checkpoints", every_minutes=None) as ckpt:
        state, _, _ = ckpt.restore(STEPS, abstract_state=abstract)
    return jax.device_get(state)
