"""The typed schema of every sgt_jax setting.

The dataclasses below *are* the documentation of the configuration: each field's ``help`` metadata says what
it means, and a setting with a fixed set of values is typed by its ``Literal`` choices. A run's configuration is
the schema's defaults, overlaid by a YAML file from ``configs/`` (with its block for the run's platform,
:mod:`sgt_jax.config.platform_blocks`) and then by dotted ``key=value`` command-line overrides, merged and
type-checked by OmegaConf structured configs. Unknown keys, wrong types and values outside a setting's choices are
refused with a one-line :class:`ConfigError` naming the key; the choices and the other value rules (ranges,
cross-field checks) live in :mod:`sgt_jax.config.checks`. ``python -m sgt_jax.config`` prints the reference
generated from this schema (README's "Configuration reference").
"""

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from sgt_jax import platforms
from sgt_jax.config.checks import (ADVERSARY_KINDS, ATTENTION_IMPLS, DATA_FORMATS, DTYPES, MATMUL_PRECISIONS,
                                   OBJECTIVE_MODES, REMAT_POLICIES, SCHEDULES, AdversaryKind, AttentionImpl,
                                   ConfigError, DataFormat, Distributed, Dtype, MatmulPrecision, ObjectiveMode,
                                   RematPolicy, Schedule, check_choice, check_cloak, choice_message, validate)
from sgt_jax.config.commands import COMMANDS, REFERENCE as COMMANDS_REFERENCE, literal_choices, section_table
from sgt_jax.config.platform_blocks import PLATFORM_BLOCKS, REFERENCE as PLATFORM_REFERENCE, file_layers, one_line

__all__ = [
    "ConfigError",
    "ModelConfig",
    "CloakConfig",
    "ObjectiveConfig",
    "OptimizerConfig",
    "DataConfig",
    "MeshConfig",
    "CheckpointConfig",
    "TrackingConfig",
    "ValidationConfig",
    "GenerationConfig",
    "TrainConfig",
    "SGTConfig",
    "load_config",
    "validate",
    "check_choice",
    "check_cloak",
    "to_dict",
    "reference_markdown",
    "DEFAULT_MODEL",
    "PLATFORM_BLOCKS",
    "ADVERSARY_KINDS",
    "ATTENTION_IMPLS",
    "DATA_FORMATS",
    "DTYPES",
    "MATMUL_PRECISIONS",
    "OBJECTIVE_MODES",
    "REMAT_POLICIES",
    "SCHEDULES",
]

# The embedded default base model: shipped inside the package, so a fresh install runs without a download.
DEFAULT_MODEL = "embedded:tiny-llama"


def _setting(default: Any, text: str) -> Any:
    """A schema field documented by its ``help`` metadata (the reference's "meaning"); a list or dict default is
    copied for each instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class ModelConfig:
    path: str = _setting(
        DEFAULT_MODEL, 'Directory of the frozen base model in Hugging Face layout (config.json, safetensors, '
        'tokenizer), or "embedded:tiny-llama" for the tiny model shipped with the package.')
    dtype: Dtype = _setting("bfloat16", "Compute/storage dtype of the frozen base model. The cloak is always float32.")
    truncate_at_layer: Optional[int] = _setting(
        None, "Build and load only embeddings + layers 0..k (ssl mode). None: the whole model. The recommendations "
        "advise 12 for 32-layer models (13 layers kept).")
    attention_impl: AttentionImpl = _setting(
        "xla", "Attention kernel of the base model: xla (everywhere), cudnn (flash, GPU), splash (TPU).")
    remat_policy: RematPolicy = _setting(
        "none", "Rematerialisation of the scanned layers: none, full, dots_saveable, dots_with_no_batch_dims_saveable.")


@dataclass
class CloakConfig:
    scale: Optional[List[float]] = _setting(
        None, "(min_scale, max_scale) bounds of sigma. None: (1e-8, 1.0) when directly_learn_stds else (1e-3, 1.0).")
    transformer_type: Optional[str] = _setting(
        None, "Decoder family of the estimators; None: read from config_path's model_type. Must match it.")
    config_path: Optional[str] = _setting(None, "Base model directory the estimators are built from; None: model.path.")
    percent_to_mask: float = _setting(
        0.0, "Fraction in [0, 1] of features per token replaced by the deterministic part (experimental; keep 0).")
    shallow: float = _setting(1.0, "Temperature of the rho parameterisation (directly_learn_stds=False); keep 1.0.")
    seed: Optional[int] = _setting(
        None, "None: fresh OS entropy for the noise (secure). An int: reproducible noise (debug only, never secure).")
    rho_init: Optional[float] = _setting(None, "Initial std head output; None: 0.0 when directly_learn_stds else -3.0.")
    mean_bound: float = _setting(
        0.0, "Bounded mean (experimental, 0 = off): > 0 limits the deterministic shift in noise units, ||mu / sigma|| "
        "<= b per token (mu <- mu * b tanh(r / b) / r, r = ||mu / sigma||), so mu can add at most 2b noise standard "
        "deviations of separation between two tokens (docs/privacy_objectives.md).")
    std_dropout: float = _setting(
        0.1, "dropout on the std estimator's output, before its head; off in eval (recommended: 0.1)")
    mean_dropout: float = _setting(
        0.1, "dropout on the mean estimator's output, before its head; off in eval (recommended: 0.1)")
    directly_learn_stds: bool = _setting(
        True, "true: sigma = clip(head, min, max) (recommended start); false: the tanh(rho / shallow) form")
    mean_num_experts: int = _setting(0, ">0: the mean estimator's MLP is a top-2 mixture of that many experts")
    std_num_experts: int = _setting(0, ">0: the std estimator's MLP is a top-2 mixture of that many experts")
    use_causal_mask: bool = _setting(True, "causal (true) or bidirectional attention inside the estimators")
    estimator_kwargs: Dict[str, Any] = _setting(
        {"num_hidden_layers": 1}, "Passed to the estimators' decoder config (the recommendations' **kwargs), e.g. "
        "num_hidden_layers.")
    remat_policy: RematPolicy = _setting(
        "none", "Rematerialisation of the estimators' layers in training (none | full | a jax.checkpoint_policies "
        "name): trades recomputation for activation memory; the transform itself is unchanged.")
    matmul_precision: MatmulPrecision = _setting(
        "highest", "Precision of every matmul of the cloak, forward and backward: highest (true float32; on a TPU "
        "several bfloat16 passes, ~3-6x the MXU time of the cloak's matmuls), high (bf16x3) or default (one bfloat16 "
        "pass on a TPU, TF32 on recent GPUs: not the single precision the transform needs). The base is unaffected.")


@dataclass
class ObjectiveConfig:
    mode: ObjectiveMode = _setting(
        "ssl", "Utility loss L_M: ssl (hidden state at truncate_at_layer; recommended), lm, or distill.")
    alpha: float = _setting(0.54, "balance of utility (1 - alpha) against obfuscation (alpha)")
    transform_variance_priority: float = _setting(0.01, "weight of L_N (stochasticity: pushes sigma up)")
    transform_strength_priority: float = _setting(0.75, "weight of L_S (semantic similarity |cos(x, x_t)|)")
    weight: float = _setting(12.0, "scale of the utility loss L_M")
    ssl_relative_l2_weight: float = _setting(0.0, "ssl: weight of the optional relative-L2 term added to (1 - cos).")
    moe_aux_loss_weight: float = _setting(
        0.01, "Weight of the mixture-of-experts load-balancing loss (only with *_num_experts > 0).")
    vocab_chunk_size: int = _setting(0, "lm/distill: vocabulary chunk for the cross-entropy (0: no chunking).")
    adversary: AdversaryKind = _setting(
        "off", "Learned adversary trained alongside the cloak to recover the tokens from x_t: off, mlp or transformer. "
        "The cloak's loss gains adversary_weight * max(log p_inverter(true token), -log V) (min-max).")
    adversary_weight: float = _setting(1.0, "weight of the adversary's penalty in the cloak's loss")
    adversary_learning_rate: float = _setting(1.0e-3, "Adam learning rate of the adversary's inverter")
    adversary_steps: int = _setting(
        1, "Inverter optimizer steps per cloak step (the first on the step's own batch and noise, the rest on fresh "
        "noise).")
    adversary_reset_every: int = _setting(
        0, "A fresh adversary (experimental, 0 = off): every adversary_reset_every steps the inverter is "
        "re-initialised and trained adversary_reset_steps steps on the current cloak (fresh noise) before the cloak's "
        "step.")
    adversary_reset_steps: int = _setting(100, "inverter-only steps on the current cloak after each re-initialisation")
    posterior_weight: float = _setting(
        0.0, "Candidate-mean posterior penalty (experimental, 0 = off): the cloak's loss gains posterior_weight * the "
        "mean posterior mass on the true token among posterior_candidates candidates, each read with its own "
        "transformed mean, at posterior_positions sampled noised positions per example (docs/privacy_objectives.md).")
    posterior_candidates: int = _setting(8, "candidate tokens per position: the true one and the hardest others")
    posterior_positions: int = _setting(2, "noised positions drawn per example for the posterior penalty")


@dataclass
class OptimizerConfig:
    learning_rate: float = _setting(
        3e-5, "peak learning rate (recommended: the base model's final lr, 3e-5 for Llama 2)")
    b1: float = _setting(0.9, "AdamW beta1")
    b2: float = _setting(0.95, "AdamW beta2")
    eps: float = _setting(1e-5, "AdamW epsilon")
    weight_decay: float = _setting(
        0.1, "Decoupled weight decay for every cloak parameter except the estimator heads (always 0 there).")
    schedule: Schedule = _setting("cosine", "after warm-up: cosine, linear or constant")
    warmup_steps: int = _setting(100, "linear warm-up steps")
    end_lr_ratio: float = _setting(
        0.1, "Final learning rate of the cosine/linear decay as a fraction of learning_rate.")
    max_grad_norm: float = _setting(1.0, "global-norm gradient clipping")
    grad_accum_steps: int = _setting(
        1, "Micro-batches of data.batch_size accumulated inside one compiled optimizer step (one gradient reduction): "
        "an optimizer step sees data.batch_size x grad_accum_steps examples.")


@dataclass
class DataConfig:
    source: str = _setting(
        "synthetic", '"synthetic" (the embedded corpus), a local json/jsonl/csv/parquet/arrow file, a save_to_disk '
        'directory, or a hub dataset name (needs a network).')
    format: DataFormat = _setting("alpaca", "alpaca, openorca, chat or text")
    split: str = _setting("train", "split of source used for training")
    validation_source: Optional[str] = _setting(
        None, "Validation: an explicit file/directory, or a split name of source, else a seeded hold-out fraction.")
    validation_split: Optional[str] = _setting(None, "split name of source used for validation")
    validation_fraction: float = _setting(0.02, "seeded hold-out fraction when no validation source/split is given")
    text_column: str = _setting("text", "Column for format=text; column of the message list for format=chat.")
    messages_column: str = _setting("messages", "column of the message list for format=chat")
    max_length: int = _setting(256, "tokens per example (longer ones are truncated, counted and reported)")
    buckets: List[int] = _setting(
        [64, 128, 256], "Batch lengths are padded up to the smallest bucket that fits (bounded set of compiled "
        "shapes).")
    packing: bool = _setting(
        False, "Concatenate examples with eos and cut to max_length (drops the last partial sequence).")
    transform_all_tokens: bool = _setting(False, "Transform every non-pad token, not just the prompt's content tokens.")
    batch_size: int = _setting(
        8, "Global micro-batch size (summed over hosts; a multiple of the process count); an optimizer step sees "
        "batch_size x optimizer.grad_accum_steps examples.")
    shuffle_seed: int = _setting(0, "seed of the global shuffle and of the hold-out split")
    num_epochs: int = _setting(1, "passes over the training set (<= 0: forever; then set train.max_steps)")
    num_workers: int = _setting(-1, "Grain worker processes; -1: 4 where there are enough cores, else 0.")
    prefetch_buffer_size: int = _setting(2, "batches prefetched by the pipeline")
    cache_dir: Optional[str] = _setting(None, "Tokenized-data cache directory; None: ~/.cache/sgt_jax.")
    synthetic_num_examples: int = _setting(4000, "Size of the embedded synthetic corpus.")
    synthetic_seed: int = _setting(1234, "seed of the embedded synthetic corpus")


@dataclass
class MeshConfig:
    data: int = _setting(
        -1, "Sizes of the (data, fsdp, tensor) mesh axes; one may be -1 to take the remaining devices.")
    fsdp: int = _setting(1, "devices the parameters (and the batch) are sharded over")
    tensor: int = _setting(1, "devices the heads / MLP / vocabulary dimensions are split over")
    distributed: Distributed = _setting(
        "auto", 'Multi-host start-up: "auto" initialises jax.distributed when the environment says multi-host; true / '
        'false force it on / off (YAML booleans are accepted).')
    coordinator_address: Optional[str] = _setting(None, "host:port of process 0 for jax.distributed (multi-node GPU)")
    num_processes: Optional[int] = _setting(None, "number of processes for jax.distributed")
    process_id: Optional[int] = _setting(None, "this process's index for jax.distributed")


@dataclass
class CheckpointConfig:
    directory: Optional[str] = _setting(None, "Directory of the checkpoints; None: <tracking.run_dir>/checkpoints.")
    every_minutes: Optional[float] = _setting(30.0, "Save every N minutes of wall-clock (None: no time-based saves).")
    every_steps: Optional[int] = _setting(
        None, "Also save every N steps (None: only by time, preemption and at the end).")
    keep: int = _setting(3, "keep the last N complete checkpoints")
    save_on_preemption: bool = _setting(True, "on SIGTERM/SIGINT: save at the current step, then exit cleanly (code 0)")
    async_save: bool = _setting(True, "write checkpoints in the background while training continues")
    resume: bool = _setting(True, "Resume automatically from the latest complete checkpoint in directory.")


@dataclass
class TrackingConfig:
    run_dir: str = _setting(
        "runs/sgt", "the run's directory: tensorboard/, checkpoints/, sgt/ (the artifact), base_generations.json")
    tensorboard: bool = _setting(True, "write tensorboardX event files")
    wandb: bool = _setting(False, "also log to Weights & Biases (when installed)")
    wandb_project: str = _setting("sgt_jax", "wandb project name")
    log_every_steps: int = _setting(10, "training scalars every N steps")
    histogram_every_steps: int = _setting(100, "head-weight histograms every N steps (sigma/mu at each validation)")
    progress_bar: bool = _setting(True, "a progress bar with ETA and tokens/s")


@dataclass
class ValidationConfig:
    every_steps: Optional[int] = _setting(200, "validate every N steps (null: not by steps)")
    every_minutes: Optional[float] = _setting(None, "validate every M minutes of wall-clock (null: not by time)")
    max_batches: Optional[int] = _setting(8, "Batches of the validation set per validation (None: all).")
    generation_examples: int = _setting(
        8, "Prompts of the generation set (0 disables generation metrics during training). A quick check: python -m "
        "sgt_jax.evaluate scores ROUGE on its own --generation-examples (default 64), enough for a readable mean.")
    perplexity: bool = _setting(
        True, "Perplexity and next-token agreement need the whole base model: when training is truncated (ssl), the "
        "full model is loaded once for validation. false: skip them (e.g. when memory is tight).")
    attack_steps: int = _setting(
        300, "Adam steps of the learned per-position (mlp) inversion attack reported at the end of training and by "
        "sgt_jax.evaluate next to nearest-neighbour obfuscation (0: off; python -m sgt_jax.attack for the full set).")
    leakage_positions: int = _setting(
        64, "The leakage figure of every validation (bits per noised token): at this many transformed positions of the "
        "validation prompts, each of leakage_candidates tokens is read with its own transformed mean (the cloak run "
        "with that token substituted: positions x candidates extra cloak passes per validation). 0: off.")
    leakage_candidates: int = _setting(
        16, "candidate tokens per position (the true one and the nearest under a shared mean)")


@dataclass
class GenerationConfig:
    do_sample: bool = _setting(True, "sample (recommended: true); false: greedy")
    temperature: float = _setting(0.6, "softmax temperature (recommended: 0.6)")
    top_k: int = _setting(5000, "sample among the k most likely tokens (recommended: 5000; 0: off)")
    top_p: float = _setting(0.9, "nucleus sampling mass (recommended: 0.9)")
    repetition_penalty: float = _setting(1.0, "HF repetition penalty (recommended: 1.0)")
    renormalize_logits: bool = _setting(True, "renormalise the processed logits (recommended: always true)")
    max_new_tokens: int = _setting(64, "tokens generated per prompt at most (stops earlier at eos)")


@dataclass
class TrainConfig:
    max_steps: Optional[int] = _setting(
        None, "Optimizer steps; None: exactly data.num_epochs over the training set (examples x epochs divided by "
        "data.batch_size x optimizer.grad_accum_steps).")
    seed: int = _setting(
        0, "Run key seed: the per-step keys derive from (run key, step), so a resumed run draws the same noise.")
    max_nonfinite_steps: int = _setting(10, "Consecutive non-finite steps (skipped) after which the run stops.")
    artifact_dir: Optional[str] = _setting(
        None, "Where the SGT artifact goes at the end; None: <tracking.run_dir>/sgt.")
    max_utility_loss: Optional[float] = _setting(
        None, "The utility budget of the privacy-utility summary: the final validation utility loss must stay at or "
        "below it (reported as utility_within_bound; None: not judged).")

@dataclass
class SGTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cloak: CloakConfig = field(default_factory=CloakConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _choices(cls) -> Dict[str, tuple]:
    """The ``Literal`` choices of each choice setting of a schema dataclass, by field name."""
    return {f.name: choices for f in dataclasses.fields(cls) if (choices := literal_choices(f.type))}


def _spell_booleans(layer: DictConfig) -> DictConfig:
    """YAML, in files and in key=value overrides alike, reads off/on/no/yes/false/true as booleans; a boolean given
    to a choice setting becomes the choice YAML reads as that boolean (``objective.adversary: off`` -> "off",
    ``mesh.distributed: false`` -> "false") before the typed merge, so the choices stay strings (applied to a
    layer and its platform blocks)."""
    for node in [layer, *(layer.get(name) for name in PLATFORM_BLOCKS)]:
        for section in dataclasses.fields(SGTConfig) if isinstance(node, DictConfig) else ():
            values, choices = node.get(section.name), _choices(section.type)
            for key, value in values.items_ex(resolve=False) if isinstance(values, DictConfig) else ():
                if key in choices and isinstance(value, bool):
                    values[key] = next((c for c in choices[key] if yaml.safe_load(c) is value), value)
    return layer


def _file_with_bases(path: Path, schema, platform: Optional[str], seen: tuple) -> list:
    """A config file's layers over those of the file its top-level ``base:`` names (a path relative to it, itself
    possibly with a base): a recipe is written as the delta over a shared base."""
    if not path.is_file():
        where = f" (the base of {str(seen[-1])!r})" if seen else ""
        raise ConfigError(f"config file {str(path)!r}{where} does not exist; pass --config with a YAML file from "
                          "configs/.")
    if path.resolve() in seen:
        raise ConfigError(f"config file {str(path)!r}: its `base:` chain comes back to itself.")
    try:
        data = OmegaConf.load(path)
    except Exception as exc:  # yaml parse errors
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, DictConfig):
        return [data]  # the schema merge names what is wrong
    _spell_booleans(data)
    layers = []
    if "base" in data:
        base = data.pop("base")
        if not isinstance(base, str) or not base:
            raise ConfigError(f"config file {str(path)!r}: `base:` must be the path of another config file, "
                              "relative to this one (e.g. `base: base.yaml`).")
        layers = _file_with_bases(path.parent / base, schema, platform, (*seen, path.resolve()))
    return layers + file_layers(data, str(path), schema, platform)


def load_config(
    path: Optional[str | os.PathLike] = None,
    overrides: Sequence[str] = (),
    *,
    saved: Optional[Mapping[str, Any]] = None,
    platform: Optional[str] = None,
) -> SGTConfig:
    """Defaults ← ``saved`` (a config written by :func:`to_dict`, e.g. an artifact's) ← the file's ``base:`` (and
    its block for ``platform``), recursively ← YAML file ← the file's block for ``platform`` (``tpu:``, ``gpu:`` or ``cpu:``; None: the platform a run here uses, see
    :func:`sgt_jax.platforms.local_platform`) ← ``key=value`` overrides, type-checked, then validated.

    Returns a plain :class:`SGTConfig` dataclass instance (not an OmegaConf node).
    """
    if platform is None:
        platform = platforms.local_platform()
    check_choice(platform, PLATFORM_BLOCKS, "platform")
    schema = OmegaConf.structured(SGTConfig)
    layers = [OmegaConf.create(dict(saved))] if saved else []
    if path is not None:
        layers += _file_with_bases(Path(path), schema, platform, ())
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optimizer.learning_rate=1e-4).")
    if overrides:
        try:
            layers.append(_spell_booleans(OmegaConf.from_dotlist(list(overrides))))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"bad override: {one_line(exc)}") from None
    try:
        merged = OmegaConf.merge(schema, *layers)
        cfg: SGTConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        choices = _choices(exc.object_type).get(exc.key) if dataclasses.is_dataclass(exc.object_type) else None
        # A value outside a setting's choices: the line the models and the cloak give for it (check_choice's).
        raise ConfigError(choice_message(exc.value, choices, exc.full_key) if choices
                          else f"invalid configuration: {one_line(exc)}") from None
    validate(cfg)
    return cfg


def to_dict(cfg: SGTConfig) -> Dict[str, Any]:
    """A plain dict of ``cfg`` (what checkpoints and artifacts store); ``load_config(saved=...)`` rebuilds it."""
    return dataclasses.asdict(cfg)


def reference_markdown() -> str:
    """The configuration reference, generated from the schema (README's "Configuration reference"): the run's
    sections, the platform blocks, then the sections the other commands read."""
    runs = [section_table(f.name, f.type) for f in dataclasses.fields(SGTConfig)]
    commands = [section_table(name, cls) for name, cls in COMMANDS.items()]
    return "\n".join(runs) + "\n" + PLATFORM_REFERENCE + "\n" + COMMANDS_REFERENCE + "\n" + "\n".join(commands)
