"""``python -m sgt_jax.train [--config configs/X.yaml] [key=value ...]``: train a Stained Glass Transform.

Build (config → mesh → frozen base model → data → cloak + optimizer → checkpoints), loop (train step,
validation, checkpoints, tracking), save (final checkpoint, SGT artifact, summary). Details live in the
modules; this file should read like a table of contents.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from sgt_jax import config as config_lib
from sgt_jax.config import SGTConfig
from sgt_jax.errors import run_cli
from sgt_jax.training import compile as compile_lib
from sgt_jax.training.run import train


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
    parser.add_argument("--topology", help="with --compile-only: what to compile for on this machine (no TPU or GPU "
                        "needed), a TPU slice such as v5e:4x4, v4:2x2x2, v5p:2x2x2 (needs the tpu extra) or GPU nodes "
                        "as <chip>:<gpus> or <chip>:<hosts>x<gpus>, e.g. h100:8, h100:2x8, a100-80g:8, a100-40g:8 "
                        "(needs the gpu extra); the config file's tpu: or gpu: block applies; default: the local "
                        "devices")
    parser.add_argument("--compile-report", help="with --compile-only: also write the JSON report to this path")
    parser.add_argument("--max-tokens", action="store_true",
                        help="with --compile-only: also find the largest number of tokens per device that fits (rows "
                        "of the micro-batch at the config's sequence length; every answer is one that compiled and "
                        "fitted)")
    parser.add_argument("--max-tokens-checks", type=int, default=4, metavar="N",
                        help="with --max-tokens: compiles that check a proposal, at most (default 4; 1 keeps a 7B TPU "
                        "search to three compiles)")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[SGTConfig, argparse.Namespace]:
    """The run's configuration and the command's flags."""
    parser = _parser()
    args = parser.parse_intermixed_args(argv)  # flags may come after key=value overrides
    if (args.topology or args.compile_report or args.max_tokens) and not args.compile_only:
        parser.error("--topology, --compile-report and --max-tokens need --compile-only")
    # A topology's platform picks the config file's platform block; a run's is this machine's.
    platform = compile_lib.topology_platform(args.topology) if args.topology else None
    return config_lib.load_config(args.config or DEFAULT_CONFIG, args.overrides, platform=platform), args


def main(argv: Optional[Sequence[str]] = None) -> int:
    exit_code = {"code": 0}

    def body():
        cfg, args = parse_args(argv)
        if args.compile_only:
            exit_code["code"] = _compile_only(cfg, args)
        else:
            train(cfg)

    return run_cli(body) or exit_code["code"]


def _compile_only(cfg: SGTConfig, args: argparse.Namespace) -> int:
    """The --compile-only report; its own exit code when the step does not fit the devices."""
    try:
        compile_lib.compile_only(cfg, topology=args.topology, report_path=args.compile_report,
                                 max_tokens=args.max_tokens_checks if args.max_tokens else 0)
    except compile_lib.CompileFitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return compile_lib.FIT_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
