"""One assembly of the experiment (sgt_jax.training.builder): the trainer and --compile-only compile the same train
step for the same configuration."""

import re

import pytest

pytestmark = pytest.mark.slow  # a Trainer and two compiles of the tiny default: ~40 s on 2 cores


def _normalized(text: str) -> str:
    """Optimized HLO without what names where it was traced from: the module name, the debug tables of file
    names and stack frames, op metadata, and the numbering of instructions and computations."""
    lines, skipping = [], False
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            skipping = True
        elif skipping and line.startswith(("%", "ENTRY")):
            skipping = False
        if not skipping and not line.startswith("HloModule"):
            lines.append(line)
    text = re.sub(r", metadata=\{[^}]*\}", "", "\n".join(lines))
    return re.sub(r"(%?[A-Za-z_][\w.-]*?)\.\d+\b", r"\1", text)


def test_compile_only_and_the_trainer_compile_the_same_train_step(tmp_path):
    """The train step --compile-only compiles (abstract base, cloak and state) is the one the trainer runs (loaded
    base, initialised cloak): the same optimized HLO for the tiny default with its own batch shape. Fails if
    either path assembles the step differently (another truncation, remat, optimizer, schedule or sharding)."""
    import jax

    from sgt_jax.config import load_config
    from sgt_jax.train import DEFAULT_CONFIG
    from sgt_jax.training import compile as compile_lib
    from sgt_jax.training.trainer import Trainer

    cfg = load_config(DEFAULT_CONFIG, ["train.max_steps=7", f"tracking.run_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg)
    result = compile_lib.compile_steps(cfg, jax.devices(), with_eval=False)
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), trainer.init_state())
    batch = compile_lib.abstract_batch(cfg, trainer.mesh, cfg.optimizer.grad_accum_steps,
                                       compile_lib.step_seq_len(cfg))
    ours = trainer.jitted_train_step.lower(state, trainer.base_state, batch).compile().as_text()
    theirs = result["train"].as_text()
    assert "while" in ours and len(ours) > 10_000
    assert _normalized(ours) == _normalized(theirs)
