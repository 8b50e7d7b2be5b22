"""The command sections of the schema: what ``python -m sgt_jax.evaluate``, ``attack``, ``privacy_sweep`` and
``bench`` read besides a run's configuration, typed and documented like the training settings.

A command reads its section from ``<section>.key=value`` (``attack.steps=600``) or the same setting spelled
as a flag (``--steps 600``, ``--steps=600``; a boolean as ``--key`` / ``--no-key``; a list setting takes the
value after it and every further one up to the next flag or ``key=value``, or a YAML list ``key=[a, b]``; a
repeated setting adds to it).
Every other ``key=value`` overrides the run's configuration, as in ``python -m sgt_jax.train``. ``--help``
prints the section's reference, generated from the fields' ``help`` metadata like the configuration reference.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, List, Literal, Optional, Sequence, Tuple, get_args, get_origin

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sgt_jax.config.checks import ConfigError, DataFormat, choice_message
from sgt_jax.config.platform_blocks import one_line

__all__ = ["EvaluateCommand", "AttackCommand", "SweepCommand", "BenchCommand", "COMMANDS", "parse_command",
           "section_table", "literal_choices", "REFERENCE", "RUN_FLAGS"]

THREAT_MODELS = "lookup,white-box,server"
SERVER_ATTACKS = "transfer,reader,lm_prior"
BenchShape = Literal["tiny", "small", "llama2-7b"]


def _setting(default: Any, text: str) -> Any:
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": text})
    return dataclasses.field(default=default, metadata={"help": text})


_SGT = "A training run directory (with sgt/) or an SGT artifact."


@dataclass
class EvaluateCommand:
    sgt: Optional[str] = _setting(None, _SGT + " Required.")
    data: Optional[str] = _setting(
        None, "Evaluation data (file, save_to_disk directory or hub name); null: the run's validation set.")
    format: Optional[DataFormat] = _setting(None, "Format of that data; null: the run's data.format.")
    max_batches: Optional[int] = _setting(None, "Forward batches to evaluate; null: validation.max_batches.")
    generation_examples: int = _setting(
        64, "Prompts ROUGE compares base and SGT generations on (0: none). ROUGE-L F varies so much between prompts "
        "that on the embedded default its mean has a standard error of 0.15 over 4 prompts, 0.04 over 64.")
    out: Optional[str] = _setting(None, "Report JSON path; null: <run or artifact dir>/eval_report.json.")
    seed: int = _setting(0, "Noise and sampling seed, so that reports are comparable between runs.")
    attack_steps: Optional[int] = _setting(
        None, "Adam steps of the white box's mlp inverter in the quick attack of every threat model; null: "
        "validation.attack_steps; 0: no attacks.")


@dataclass
class AttackCommand:
    sgt: Optional[str] = _setting(None, _SGT)
    frontier: List[str] = _setting(
        [], "Run directories (each attacked before) whose privacy-utility frontier to plot instead of attacking.")
    threat_model: str = _setting(THREAT_MODELS, f"Comma-separated subset of {THREAT_MODELS}.")
    attacks: str = _setting("mlp,transformer", "Learned inverters of the white box and of the transfer attack.")
    server_attacks: str = _setting(SERVER_ATTACKS, f"Comma-separated subset of {SERVER_ATTACKS}.")
    transfer_sgt: Optional[str] = _setting(
        None, "The server's own SGT for the transfer attack; null: train one with the victim's recipe.")
    transfer_data: Optional[str] = _setting(
        None, "Public data the server trains its SGT on; null: a synthetic corpus disjoint from the victim's.")
    transfer_steps: Optional[int] = _setting(None, "train.max_steps of the server's SGT; null: the victim's recipe.")
    train_data: Optional[str] = _setting(None, "Public data the attackers train on; null: the run's training split.")
    eval_data: Optional[str] = _setting(None, "Held-out prompts to attack; null: the run's validation split.")
    steps: int = _setting(1500, "Adam steps per learned attacker.")
    batch_size: int = _setting(32, "Attacker batch size in prompts.")
    max_eval: int = _setting(256, "Held-out prompts to attack.")
    ceiling: bool = _setting(True, "Also attack clean embeddings (the ceiling); false halves the learned attacks.")
    exact_positions: int = _setting(256, "Positions of the white box's exact-channel figure (0: off).")
    exact_candidates: int = _setting(32, "Candidate tokens per position of that figure.")
    seed: int = _setting(0, "Attacker initialisation and noise seed.")
    out: Optional[str] = _setting(
        None, "Report path; null: <run or artifact dir>/attack_report.json (with frontier: frontier.png here).")


@dataclass
class SweepCommand:
    out: Optional[str] = _setting(None, "Directory for the runs, frontier.json and frontier.png. Required.")
    setting: List[str] = _setting(
        [], "Sweep points, each a space-separated list of key=value overrides (repeat --setting per point).")
    grid: Optional[str] = _setting(
        None, '"key=v1,v2 key2=w1,w2": every combination is a point (before the settings).')
    config: Optional[str] = _setting(None, "Training config, e.g. configs/tiny.yaml; null: the schema's defaults.")
    attack_steps: int = _setting(1500, "Adam steps of each learned attacker.")
    attacks: str = _setting("mlp", "Learned inverters (white box and transfer).")
    exact_positions: int = _setting(128, "Positions of the white box's exact-channel leakage figure (0: off).")
    transfer: bool = _setting(True, "Run the server's transfer attack (its own SGT trained once per setting).")
    transfer_steps: int = _setting(400, "train.max_steps of the server's own SGT.")


@dataclass
class BenchCommand:
    batch: int = _setting(2, "Rows per step.")
    seq: int = _setting(64, "Tokens per row.")
    base_layers: int = _setting(2, "Base layers kept (ssl: truncate_at_layer = K-1).")
    estimator_layers: int = _setting(1, "Layers per estimator of the cloak.")
    shape: Optional[BenchShape] = _setting(None, "Preset width; null: tiny.")
    hidden: Optional[int] = _setting(None, "Hidden size (overrides the preset).")
    heads: Optional[int] = _setting(None, "Attention heads (overrides the preset).")
    kv_heads: Optional[int] = _setting(None, "Key/value heads (overrides the preset).")
    intermediate: Optional[int] = _setting(None, "MLP width (overrides the preset).")
    vocab: Optional[int] = _setting(None, "Vocabulary size (overrides the preset).")
    steps: int = _setting(5, "Timed steps (the median is reported).")
    warmup: int = _setting(2, "Untimed steps first.")
    donate: bool = _setting(True, "Donate the train state to the step.")
    valid_tokens: Optional[int] = _setting(None, "Real tokens per row (left padding to seq); null: seq.")
    model_layers: Optional[int] = _setting(None, "Layers of the full model; null: base_layers.")
    memory_only: bool = _setting(False, "Compile and report memory, do not run.")
    prefetch: int = _setting(
        -1, "Also time a step loop fed from a host iterator: N > 0 prefetches N batches (Grain's device_put: N on "
        "the host, N on the device), 0 does not; -1: no loop.")
    host_delay_ms: float = _setting(0.0, "Simulated host data work per batch in the loop.")
    sync_every_step: bool = _setting(False, "In the loop, read the loss after every step (as a logging loop does).")
    out: Optional[str] = _setting(None, "Write the JSON here.")


# Flags that spell a run-config key: the bench's base, cloak, objective and optimizer settings are the run's own.
RUN_FLAGS = {"bench": {"dtype": "model.dtype", "remat": "model.remat_policy", "cloak_remat": "cloak.remat_policy",
                       "attention": "model.attention_impl", "objective": "objective.mode",
                       "vocab_chunk": "objective.vocab_chunk_size", "accum": "optimizer.grad_accum_steps"}}

REFERENCE = f"""### Command sections

`python -m sgt_jax.evaluate`, `attack`, `privacy_sweep` and `bench` read their own sections below: `attack.steps=600`
or the same setting as a flag, `--steps 600` (a boolean as `--key` / `--no-key`). Every other `key=value` on their
command line sets the run's configuration (the bench's run is its random-weight model's). `--help` prints the
command's section. The bench's {", ".join(f"`--{k.replace('_', '-')}`" for k in RUN_FLAGS["bench"])} spell
{", ".join(f"`{v}`" for v in RUN_FLAGS["bench"].values())}.
"""

# Each command's section name (its key=value prefix) and dataclass.
COMMANDS = {"evaluate": EvaluateCommand, "attack": AttackCommand, "sweep": SweepCommand, "bench": BenchCommand}


def _is_list(f: dataclasses.Field) -> bool:
    return get_origin(f.type) is list


def _is_bool(f: dataclasses.Field) -> bool:
    return f.type is bool


def literal_choices(tp) -> tuple:
    """The ``Literal`` choices of a (possibly Optional) type, else ()."""
    if get_origin(tp) is Literal:
        return get_args(tp)
    return next((literal_choices(a) for a in get_args(tp) if get_origin(a) is Literal), ())


def section_table(name: str, cls) -> str:
    """The markdown reference table of the schema section ``name`` (a dataclass): key, default, meaning (with a
    choice setting's values), from the fields' ``help`` metadata."""
    lines = [f"### `{name}`", "", "| key | default | meaning |", "|---|---|---|"]
    defaults = cls()
    for f in dataclasses.fields(cls):
        default = getattr(defaults, f.name)
        shown = "null" if default is None else OmegaConf.to_yaml({"v": default}).strip()[3:].strip().replace("\n", " ")
        meaning, choices = f.metadata["help"], literal_choices(f.type)
        if choices:
            meaning = f"{meaning.rstrip('.')}. One of: {', '.join(f'`{c}`' for c in choices)}."
        lines.append(f"| `{name}.{f.name}` | `{shown}` | {meaning.replace('|', chr(92) + '|')} |")
    return "\n".join(lines) + "\n"


def _values(value: str) -> list:
    """A list setting's ``key=value``: one value, or several written as a YAML list (``[a, b]``)."""
    if value.startswith("["):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"{value!r} is not a list: write it as [a, b] or repeat the setting.") from None
        if isinstance(parsed, list):
            return [str(v) for v in parsed]
    return [value]


def _tokens(section: str, argv: Sequence[str]) -> Tuple[dict, List[str]]:
    """(the section's values as given, by key; the run-config overrides)."""
    fields = {f.name: f for f in dataclasses.fields(COMMANDS[section])}
    given: dict = {}
    overrides: List[str] = []
    argv, i = list(argv), 0

    def field_of(name: str, spelled: str) -> dataclasses.Field:
        if name not in fields:
            raise ConfigError(f"{spelled} is not a setting of this command; its settings: "
                              f"{', '.join('--' + k.replace('_', '-') for k in fields)} (--help says what each is).")
        return fields[name]

    while i < len(argv):
        token, i = argv[i], i + 1
        if token.startswith("--"):
            name, has_value, value = token[2:].partition("=")
            name = name.replace("-", "_")
            if name in RUN_FLAGS.get(section, {}):
                if not has_value and i >= len(argv):
                    raise ConfigError(f"{token} needs a value.")
                value, i = (value, i) if has_value else (argv[i], i + 1)
                overrides.append(f"{RUN_FLAGS[section][name]}={value}")
                continue
            if not has_value and name.startswith("no_") and name[3:] in fields and _is_bool(fields[name[3:]]):
                given[name[3:]] = "false"
                continue
            f = field_of(name, token.split("=")[0])
            if has_value:
                given[f.name] = given.get(f.name, []) + _values(value) if _is_list(f) else value
            elif _is_bool(f):
                given[f.name] = "true"
            elif _is_list(f):
                values = argv[i:i + 1]  # the first value is taken whatever it holds (a sweep point has '=')
                i += len(values)
                while i < len(argv) and not argv[i].startswith("--") and "=" not in argv[i]:
                    values.append(argv[i])
                    i += 1
                given[f.name] = given.get(f.name, []) + values
            elif i < len(argv):
                given[f.name], i = argv[i], i + 1
            else:
                raise ConfigError(f"{token} needs a value.")
        elif token.startswith(section + ".") and "=" in token:
            key, _, value = token[len(section) + 1:].partition("=")
            f = field_of(key, f"{section}.{key}")
            given[f.name] = given.get(f.name, []) + _values(value) if _is_list(f) else value
        elif "=" in token:
            overrides.append(token)
        else:
            raise ConfigError(f"unexpected argument {token!r}: pass settings as --key value or {section}.key=value, "
                              "run-config overrides as key=value (--help lists the settings).")
    return given, overrides


def parse_command(section: str, argv: Sequence[str], *, prog: str, doc: str = "",
                  run_overrides: bool = True) -> Tuple[Any, List[str]]:
    """(the command's typed section, the run-config ``key=value`` overrides, which a command without a run
    refuses: ``run_overrides=False``) of a command line; ``--help`` prints the command's description and its
    settings, then exits."""
    if any(a in ("-h", "--help") for a in argv):
        tail = " [run-config key=value ...]" if run_overrides else ""
        print(f"usage: {prog} [--key value | {section}.key=value ...]{tail}\n\n{doc.strip()}"
              f"\n\nsettings (--key value is section.key=value):\n\n{section_table(section, COMMANDS[section])}"
              + "".join(f"\n--{k.replace('_', '-')} V is {v}=V" for k, v in RUN_FLAGS.get(section, {}).items()))
        raise SystemExit(0)
    given, overrides = _tokens(section, argv)
    if overrides and not run_overrides:
        raise ConfigError(f"{overrides[0]!r}: {prog} takes only its own settings ({section}.key=value or --key "
                          "value); --help lists them.")
    cls = COMMANDS[section]
    try:
        layer = OmegaConf.from_dotlist([f"{k}={v}" for k, v in given.items() if not isinstance(v, list)])
        for k, v in given.items():
            if isinstance(v, list):
                layer[k] = v
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), layer)), overrides
    except OmegaConfBaseException as exc:
        choices = literal_choices(cls.__annotations__.get(exc.key)) if exc.key else ()
        if choices and exc.value is not None:
            raise ConfigError(choice_message(exc.value, choices, f"{section}.{exc.key}")) from None
        raise ConfigError(f"invalid {section} setting: {one_line(exc)}") from None
