"""The privacy–utility sweep: ``python -m sgt_jax.privacy_sweep``.

For each setting (a list of ``key=value`` overrides of the training config; ``--grid`` makes the product of
several keys' values) it trains an SGT, attacks it under every threat model (``python -m sgt_jax.attack``'s
report, ``<run>/attack_report.json``), and writes ``<run>/privacy_point.json``: the run's final top-1 agreement
and utility loss from its own last validation, each threat model's strongest recovery and the leakage figure.
Then ``frontier.json`` and ``frontier.png`` (:mod:`sgt_jax.evaluation.frontier`) over every point.

Resumable: a setting whose ``privacy_point.json`` exists is not run again, an interrupted training resumes from
its checkpoint. The server's transfer attack trains the attacker's own SGT once per setting *without* its
``train.max_steps`` (at ``--transfer-steps``), in ``<out>/transfer/<setting>``, and reuses it for every length.

    python -m sgt_jax.privacy_sweep --out runs/sweep --config configs/tiny.yaml \\
        --grid "objective.transform_variance_priority=0.01,0.5 objective.alpha=0.3,0.54 train.max_steps=400,1600"

Its settings are the ``sweep`` section of the schema (``--help`` lists them); other ``key=value`` overrides
apply to the training configuration of every point.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from sgt_jax import config as config_lib
from sgt_jax.config import ConfigError
from sgt_jax.config.commands import parse_command
from sgt_jax.data.errors import DataError
from sgt_jax.errors import run_cli
from sgt_jax.evaluation.attack import attack
from sgt_jax.evaluation.frontier import frontier_point, plot_frontier
from sgt_jax.training.attack_run import train_attacker_sgt
from sgt_jax.training.run import train

log = logging.getLogger("sgt_jax.privacy_sweep")

# What a sweep run skips that only the summary and the curves need (the sweep attacks each run itself).
QUIET = ["validation.attack_steps=0", "validation.generation_examples=0", "tracking.progress_bar=false",
         "checkpoint.every_minutes=null"]


def slug(settings: Sequence[str]) -> str:
    """A directory name for a setting: ``objective.alpha=0.3 train.max_steps=400`` -> ``alpha0.3_max_steps400``."""
    parts = [f"{k.split('.')[-1]}{v}" for k, _, v in (s.partition("=") for s in settings)]
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", "_".join(parts)) or "default"


def grid(spec: str) -> list[list[str]]:
    """The settings of ``"key=v1,v2 key2=w1,w2"``: every combination, the first key varying slowest."""
    axes = []
    for item in shlex.split(spec):
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise DataError(f"--grid item {item!r} must be key=value1,value2,...")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(combo) for combo in itertools.product(*axes)]


def run_point(config_path, overrides: Sequence[str], run_dir: Path, *, transfer_dir: Optional[Path],
              transfer_steps: Optional[int], attack_kwargs: dict) -> dict[str, Any]:
    """Train one SGT, attack it, write and return ``run_dir/privacy_point.json``."""
    start = time.process_time()
    cfg = config_lib.load_config(config_path, [*QUIET, *overrides, f"tracking.run_dir={run_dir}"])
    summary = train(cfg)
    if summary.get("stopped_by") != "finished":
        raise RuntimeError(f"the run in {run_dir} stopped ({summary.get('stopped_by')}); no artifact to attack.")
    transfer = None
    if transfer_dir is not None:
        transfer = train_attacker_sgt(run_dir, transfer_dir, steps=transfer_steps)
    server_attacks = ("transfer", "reader", "lm_prior") if transfer else ("reader", "lm_prior")
    attack(run_dir, transfer_sgt=transfer, server_attacks=server_attacks, progress=False, print_table=False,
           **attack_kwargs)
    point = {"settings": list(overrides), "run_dir": str(run_dir), **frontier_point(run_dir),
             "cpu_seconds": time.process_time() - start}
    (Path(run_dir) / "privacy_point.json").write_text(json.dumps(point, indent=2))
    return point


def _without_steps(setting: Sequence[str]) -> list[str]:
    return [s for s in setting if not s.startswith("train.max_steps=")]


def sweep(settings: Sequence[Sequence[str]], out: Path, *, config_path=None, common: Sequence[str] = (),
          transfer: bool = True, transfer_steps: Optional[int] = 400, attack_kwargs: Optional[dict] = None
          ) -> list[dict[str, Any]]:
    """Every setting trained and attacked (run dirs ``out/<slug>``), then ``out/frontier.json`` and
    ``out/frontier.png``; settings already done are read back, not run again."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    points = []
    for i, setting in enumerate(settings):
        run_dir = out / slug(setting)
        done = run_dir / "privacy_point.json"
        if done.is_file():
            log.info("sweep point %d/%d: %s done, read back", i + 1, len(settings), run_dir.name)
            points.append(json.loads(done.read_text()))
            continue
        log.info("sweep point %d/%d: %s", i + 1, len(settings), " ".join(setting) or "(defaults)")
        transfer_dir = out / "transfer" / slug(_without_steps(setting)) if transfer else None
        points.append(run_point(config_path, [*common, *setting], run_dir, transfer_dir=transfer_dir,
                                transfer_steps=transfer_steps, attack_kwargs=dict(attack_kwargs or {})))
    plot_frontier(points, out / "frontier.png")
    (out / "frontier.json").write_text(json.dumps(points, indent=2))
    return points


def main(argv: Optional[Sequence[str]] = None) -> int:
    def go():
        args, common = parse_command("sweep", sys.argv[1:] if argv is None else argv,
                                     prog="python -m sgt_jax.privacy_sweep", doc=__doc__)
        if not args.out:
            raise ConfigError("pass --out DIR (sweep.out), the directory for the runs and the frontier.")
        settings = (grid(args.grid) if args.grid else []) + [shlex.split(s) for s in args.setting]
        kwargs = {"steps": args.attack_steps, "attacks": tuple(a for a in args.attacks.split(",") if a),
                  "ceiling": False, "exact_positions": args.exact_positions}
        points = sweep(settings or [[]], Path(args.out), config_path=args.config, common=common,
                       transfer=args.transfer, transfer_steps=args.transfer_steps, attack_kwargs=kwargs)
        for p in points:
            recovery = "  ".join(f"{t} {v:5.1f}%" for t, v in p["recovery"].items())
            print(f"top1 {100 * p['top1_agreement']:5.1f}%  {recovery}  {' '.join(p['settings'])}")
        return 0

    return run_cli(go)
