"""``python -m sgt_jax.attack``: attack a trained SGT under each threat model, or plot the frontier of several.

    python -m sgt_jax.attack --sgt RUN [--threat-model lookup,white-box,server] [--attacks mlp,transformer]
        [--server-attacks transfer,reader,lm_prior] [--transfer-sgt DIR | --transfer-data SRC]
        [--train-data SRC] [--eval-data SRC] [--steps 1500] [--out report.json] [key=value ...]
    python -m sgt_jax.attack --frontier RUN [RUN ...] --out frontier.png

Its settings are the ``attack`` section of the schema (``--help`` lists them; ``--steps 600`` and
``attack.steps=600`` are the same); other ``key=value`` overrides apply to the run's saved configuration.

The server's transfer attack needs the attacker's own SGT: ``--transfer-sgt`` names one, else this command
trains it (:func:`train_attacker_sgt`) with the victim's recipe (its saved training configuration) under
another run seed and fresh noise, on public data disjoint from the victim's: ``--transfer-data``, or, for the
embedded synthetic corpus, the same generator under another seed with every example of the victim's corpus
removed. It lands in ``<run>/transfer_sgt`` and is reused by later calls.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from sgt_jax.config.commands import parse_command
from sgt_jax.data.errors import DataError
from sgt_jax.data.synthetic import generate_corpus
from sgt_jax.errors import run_cli
from sgt_jax.evaluation.attack import attack
from sgt_jax.evaluation.frontier import frontier
from sgt_jax.inference.artifact import StainedGlassTransform, resolve_sgt_path
from sgt_jax.training.run import train

__all__ = ["attacker_public_data", "train_attacker_sgt", "main"]

log = logging.getLogger("sgt_jax.attack")

# The attacker's corpus seed differs from the victim's by this much (any other seed would do).
ATTACKER_SEED_OFFSET = 7919


def attacker_public_data(victim_cfg, out_dir: Path) -> str:
    """A JSON-lines file of public examples disjoint from the victim's whole corpus (for the embedded synthetic
    corpus: the generator under another seed, minus every (instruction, input) the victim's corpus holds)."""
    data = victim_cfg.data
    if data.source != "synthetic" or (data.validation_source not in (None, "synthetic")):
        raise DataError("the victim did not train on the embedded corpus: pass --transfer-data with public data "
                        "disjoint from its training data (or --transfer-sgt with an SGT trained on such data).")
    n = int(data.synthetic_num_examples)
    victim = generate_corpus(n, int(data.synthetic_seed))
    if data.validation_source == "synthetic":
        victim += generate_corpus(n, int(data.synthetic_seed) + 1)
    seen = {(e["instruction"], e["input"]) for e in victim}
    fresh = [e for e in generate_corpus(2 * n, int(data.synthetic_seed) + ATTACKER_SEED_OFFSET)
             if (e["instruction"], e["input"]) not in seen][:n]
    path = out_dir / "attacker_public.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e) + "\n" for e in fresh))
    return str(path)


def train_attacker_sgt(victim_path, out_dir, *, data: Optional[str] = None, steps: Optional[int] = None,
                       seed_offset: int = 1) -> Path:
    """The server's own SGT: the victim's recipe, another run seed, fresh noise, public data disjoint from the
    victim's; ``steps`` overrides the recipe's train.max_steps. Reused when ``out_dir`` already holds one."""
    out_dir = Path(out_dir)
    if (out_dir / "sgt" / "sgt_config.json").is_file():
        log.info("reusing the attacker's SGT in %s", out_dir)
        return out_dir
    victim = StainedGlassTransform.load(resolve_sgt_path(victim_path)[0])
    victim_cfg = victim.run_config()
    source = data or attacker_public_data(victim_cfg, out_dir)
    overrides = [f"tracking.run_dir={out_dir}", f"data.source={source}", "data.validation_source=null",
                 "data.validation_split=null", f"train.seed={victim_cfg.train.seed + seed_offset}", "cloak.seed=null",
                 "validation.attack_steps=0", "validation.generation_examples=0", "validation.max_batches=1",
                 "validation.leakage_positions=0", "tracking.progress_bar=false", "checkpoint.every_minutes=null",
                 "checkpoint.every_steps=null", "train.artifact_dir=null"]
    if steps is not None:
        overrides.append(f"train.max_steps={steps}")
    log.info("training the attacker's own SGT (the victim's recipe, public data %s) in %s", source, out_dir)
    summary = train(victim.run_config(overrides))
    if summary.get("stopped_by") != "finished":
        raise RuntimeError(f"the attacker's SGT in {out_dir} stopped ({summary.get('stopped_by')}).")
    return out_dir


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def main(argv: Optional[Sequence[str]] = None) -> int:
    def body():
        args, overrides = parse_command("attack", sys.argv[1:] if argv is None else argv,
                                        prog="python -m sgt_jax.attack", doc=__doc__)
        if args.frontier:
            return frontier(args.frontier, out=args.out or "frontier.png")
        if not args.sgt:
            raise DataError("pass --sgt RUN_OR_ARTIFACT to attack an SGT, or --frontier RUN_DIR ... to plot runs.")
        threats, server_attacks = _csv(args.threat_model), _csv(args.server_attacks)
        if "nn" in _csv(args.attacks):
            raise DataError("--attacks nn: nearest-neighbour lookup is its own threat model (--threat-model lookup); "
                            "--attacks names the learned inverters (mlp, transformer).")
        transfer = args.transfer_sgt
        if "server" in threats and "transfer" in server_attacks and transfer is None:
            artifact_dir, run_dir = resolve_sgt_path(args.sgt)
            transfer = train_attacker_sgt(args.sgt, (run_dir or artifact_dir) / "transfer_sgt",
                                          data=args.transfer_data, steps=args.transfer_steps)
        return attack(args.sgt, threat_models=threats, train_data=args.train_data, eval_data=args.eval_data,
                      attacks=_csv(args.attacks), server_attacks=server_attacks, transfer_sgt=transfer,
                      steps=args.steps, batch_size=args.batch_size, seed=args.seed, ceiling=args.ceiling,
                      exact_positions=args.exact_positions, exact_candidates=args.exact_candidates,
                      max_eval=args.max_eval, out=args.out, overrides=overrides)

    return run_cli(body)
