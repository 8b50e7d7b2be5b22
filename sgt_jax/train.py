"""``python -m sgt_jax.train [--config configs/X.yaml] [key=value ...]``: train a Stained Glass Transform.

Build (config → mesh → frozen base model → data → cloak + optimizer → checkpoints), loop (train step,
validation, checkpoints, tracking), save (final checkpoint, SGT artifact, summary). Details live in the
modules; this file should read like a table of contents.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax

from sgt_jax import config as config_lib
from sgt_jax.config import SGTConfig

log = logging.getLogger("sgt_jax.train")

# The run `python -m sgt_jax.train` does with no --config: the embedded tiny model and synthetic corpus.
# Shipped inside the package so it works from an installed wheel; configs/tiny.yaml links to it.
DEFAULT_CONFIG = Path(__file__).parent / "assets" / "tiny.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sgt_jax.train",
        description="Train a Stained Glass Transform for a frozen decoder LLM. With no arguments: the embedded "
        "tiny model and synthetic corpus (configs/tiny.yaml defaults).",
    )
    parser.add_argument("--config", help="YAML file (e.g. configs/llama2_7b.yaml) over the schema defaults; "
                        f"default: the embedded tiny run ({DEFAULT_CONFIG.name}, also configs/tiny.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optimizer.learning_rate=1e-4")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile the train and eval steps ahead of time (no weights read, nothing allocated), "
                        "report per-device memory, collectives and XLA's step-time estimate; exit 3 if it does not fit")
    parser.add_argument("--topology", help="with --compile-only: a TPU slice to compile for on this machine, e.g. "
                        "v5e:4x4, v4:2x2x2, v5p:2x2x2 (needs the tpu extra); default: the local devices")
    parser.add_argument("--compile-report", help="with --compile-only: also write the JSON report to this path")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> SGTConfig:
    return _parse(argv)[0]


def _parse(argv: Optional[Sequence[str]] = None) -> tuple[SGTConfig, argparse.Namespace]:
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.topology or args.compile_report) and not args.compile_only:
        parser.error("--topology and --compile-report need --compile-only")
    return config_lib.load_config(args.config or DEFAULT_CONFIG, args.overrides), args


def train(
    cfg: SGTConfig,
    *,
    clock: Optional[Callable[[], float]] = None,
    on_step: Optional[Callable[[int, Any], None]] = None,
) -> dict[str, Any]:
    """Run (or resume) training to the end; returns the end-of-run summary.

    ``clock``: the wall clock of the time-based checkpoint and validation intervals (injectable for tests;
    default ``time.monotonic``, or the test-only skewed clock of ``sgt_jax.loop.TEST_CLOCK_ENV``).
    ``on_step(step, state)``: called after each step's checkpoint decision (notebooks, tests, custom logging).
    """
    from sgt_jax import checkpoint as ckpt_lib
    from sgt_jax import loop, parallel, tracking
    from sgt_jax.trainer import Trainer

    parallel.maybe_initialize_distributed(cfg.mesh)
    clock = loop.clock_from_env() if clock is None else clock
    trainer = Trainer(cfg)
    run_dir = Path(cfg.tracking.run_dir)
    checkpointer = ckpt_lib.Checkpointer.from_config(cfg.checkpoint, run_dir, clock=clock)
    tracker = tracking.Tracker.from_config(cfg.tracking, trainer.saved_config)
    data_iter = iter(trainer.train_data)
    data_state = data_iter.get_state()

    state = trainer.init_state()
    if cfg.checkpoint.resume and checkpointer.latest_step() is not None:
        state, data_state = trainer.restore(checkpointer, state)
        data_iter.set_state(data_state)
        log.info("resumed from step %d in %s", int(state.step), checkpointer.directory)

    start_step = int(state.step)
    bar = tracking.ProgressBar.from_config(cfg.tracking, trainer.total_steps, initial=start_step)
    before = trainer.validate(state, step=start_step, tracker=tracker, label="before") if start_step == 0 else None
    guard_signals = ckpt_lib.PreemptionGuard.SIGNALS if cfg.checkpoint.save_on_preemption else ()
    with ckpt_lib.PreemptionGuard(guard_signals) as guard:
        result = loop.run(trainer, state, data_iter, data_state, checkpointer=checkpointer, tracker=tracker,
                          guard=guard, bar=bar, clock=clock, on_step=on_step)
    state, stopped_by = result.state, result.stopped_by
    log.info("training stopped (%s) at step %d", stopped_by, int(state.step))

    bar.close()
    if stopped_by != "non-finite":
        checkpointer.save(int(state.step), state, data_state=result.data_state,
                          config=trainer.saved_config, force=stopped_by == "preempted")
    checkpointer.wait()
    checkpointer.close()
    summary: dict[str, Any] = {"stopped_by": stopped_by, "steps": int(state.step)}
    if stopped_by == "finished":
        after = trainer.validate(state, step=int(state.step), tracker=tracker, label="after")
        artifact_dir = trainer.save_artifact(state)
        summary.update(trainer.summarize(before, after))
        summary.update({f"{k} (step 0)": v for k, v in result.first_grad_norms.items()})
        summary["artifact"] = str(artifact_dir)
        if cfg.validation.attack_steps and jax.process_index() == 0:
            from sgt_jax.attack import summary_attack_lines

            summary.update(summary_attack_lines(artifact_dir, steps=cfg.validation.attack_steps))
    data_iter.close()
    tracker.close()
    from sgt_jax.privacy_sweep import summary_verdict

    verdict = summary_verdict(summary)  # says plainly when a learned attacker recovers the tokens
    if verdict:
        summary["privacy"] = verdict
    if jax.process_index() == 0:
        print(tracking.summary_table(summary, title="SGT training summary"), flush=True)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    from sgt_jax.errors import run_cli

    outcome = {"code": 0}

    def body():
        cfg, args = _parse(argv)
        if not args.compile_only:
            train(cfg)
            return
        from sgt_jax import compile as compile_lib

        try:
            compile_lib.compile_only(cfg, topology=args.topology, report_path=args.compile_report)
        except compile_lib.CompileFitError as exc:
            print(f"error: {exc}", file=sys.stderr)
            outcome["code"] = compile_lib.FIT_EXIT_CODE

    return run_cli(body) or outcome["code"]


if __name__ == "__main__":
    sys.exit(main())
