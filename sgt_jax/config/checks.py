"""The value rules of the settings: the choices each setting allows and the checks a type system cannot express.

They live here once. Each choice is a ``Literal`` type, which the schema's fields carry, so the typed merge of
:func:`sgt_jax.config.load_config` refuses any other value; the other rules are applied by
:func:`validate`. The models and the cloak apply the same functions to their constructor arguments (the
choice tuples below with :func:`check_choice`), so code that builds them directly meets the same rules (raising
their own error types, all one-line :class:`SGTError` s).
"""

from __future__ import annotations

import numbers
from typing import Literal, Sequence, get_args

from sgt_jax.errors import SGTError

AttentionImpl = Literal["xla", "cudnn", "splash"]
RematPolicy = Literal["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"]
ObjectiveMode = Literal["ssl", "lm", "distill"]
AdversaryKind = Literal["off", "mlp", "transformer"]
Schedule = Literal["cosine", "linear", "constant"]
DataFormat = Literal["alpaca", "openorca", "chat", "text"]
Dtype = Literal["bfloat16", "float32", "float16"]
MatmulPrecision = Literal["default", "high", "highest"]
Distributed = Literal["auto", "true", "false"]

ATTENTION_IMPLS = get_args(AttentionImpl)
REMAT_POLICIES = get_args(RematPolicy)
OBJECTIVE_MODES = get_args(ObjectiveMode)
ADVERSARY_KINDS = get_args(AdversaryKind)
SCHEDULES = get_args(Schedule)
DATA_FORMATS = get_args(DataFormat)
DTYPES = get_args(Dtype)
MATMUL_PRECISIONS = get_args(MatmulPrecision)


class ConfigError(SGTError):
    """A user-caused configuration problem, reported in one sentence naming the setting and the fix."""


def check(cond: bool, message: str, error: type[SGTError] = ConfigError) -> None:
    if not cond:
        raise error(message)


def choice_message(value, choices: Sequence[str], key: str) -> str:
    return f"{key}={value!r} is not one of {', '.join(choices)}."


def check_choice(value: str, choices: Sequence[str], key: str, error: type[SGTError] = ConfigError) -> None:
    check(value in choices, choice_message(value, choices, key), error)


def check_cloak(c, error: type[SGTError] = ConfigError) -> None:
    """The cloak's own settings (a :class:`~sgt_jax.config.CloakConfig`); what needs the base model's
    config.json (transformer_type) is checked where the cloak reads it."""
    check_choice(c.remat_policy, REMAT_POLICIES, "cloak.remat_policy", error)
    check_choice(c.matmul_precision, MATMUL_PRECISIONS, "cloak.matmul_precision", error)
    if c.scale is not None:
        check(len(c.scale) == 2, f"cloak.scale={list(c.scale)} must be [min_scale, max_scale].", error)
        lo, hi = (float(s) for s in c.scale)
        check(0.0 < lo < hi, f"cloak.scale=[{lo}, {hi}] needs 0 < min_scale < max_scale; try [1e-8, 1.0] with "
              "directly_learn_stds=true or [1e-3, 1.0] without.", error)
    check(not (c.directly_learn_stds and c.rho_init not in (None, 0.0)),
          f"cloak.rho_init={c.rho_init} must be 0.0 when cloak.directly_learn_stds=true (other values diverge); "
          "set rho_init=0.0 or directly_learn_stds=false.", error)
    check(0.0 <= c.percent_to_mask <= 1.0, f"cloak.percent_to_mask={c.percent_to_mask} must be in [0, 1] (keep 0.0).",
          error)
    check(c.shallow > 0, f"cloak.shallow={c.shallow} must be > 0 (keep 1.0).", error)
    check(c.mean_bound >= 0, f"cloak.mean_bound={c.mean_bound} must be >= 0 (0: the mean is not bounded).", error)
    for name in ("std_dropout", "mean_dropout"):
        rate = getattr(c, name)
        check(0.0 <= rate < 1.0, f"cloak.{name}={rate} must be in [0, 1) (recommended 0.1).", error)
    for name in ("mean_num_experts", "std_num_experts"):
        n = getattr(c, name)
        check(n >= 0, f"cloak.{name}={n} must be >= 0 (0: a dense MLP).", error)
    check(c.seed is None or isinstance(c.seed, numbers.Integral),
          f"cloak.seed={c.seed!r} must be an int (debug only) or null (secure).", error)


def validate(cfg) -> None:
    """Cross-field checks of a whole :class:`~sgt_jax.config.SGTConfig`; each error names the setting and the fix."""
    if cfg.model.truncate_at_layer is not None:
        check(cfg.model.truncate_at_layer >= 0, "model.truncate_at_layer must be >= 0 (or null for the whole model).")
    check_cloak(cfg.cloak)
    _check_objective(cfg.objective, cfg.model)
    opt = cfg.optimizer
    check(opt.learning_rate > 0, "optimizer.learning_rate must be > 0.")
    check(opt.grad_accum_steps >= 1, "optimizer.grad_accum_steps must be >= 1.")
    check(opt.warmup_steps >= 0, "optimizer.warmup_steps must be >= 0.")
    d = cfg.data
    check(d.batch_size >= 1, "data.batch_size must be >= 1.")
    check(d.max_length >= 2, "data.max_length must be >= 2.")
    check(len(d.buckets) > 0 and all(b > 0 for b in d.buckets), "data.buckets must be a non-empty list of positive lengths.")
    check(max(d.buckets) >= d.max_length, f"data.buckets' largest ({max(d.buckets)}) must be >= data.max_length ({d.max_length}).")
    check(0.0 <= d.validation_fraction < 1.0, "data.validation_fraction must be in [0, 1).")
    check(cfg.validation.attack_steps >= 0, "validation.attack_steps must be >= 0 (0 turns the learned attack off).")
    check(cfg.validation.leakage_positions >= 0, "validation.leakage_positions must be >= 0 (0 turns the figure off).")
    check(cfg.validation.leakage_candidates >= 2, "validation.leakage_candidates must be >= 2 (the true token and "
          "at least one other).")
    m = cfg.mesh
    sizes = [m.data, m.fsdp, m.tensor]
    check(sum(1 for s in sizes if s == -1) <= 1, "mesh: at most one of data, fsdp, tensor may be -1.")
    check(all(s == -1 or s >= 1 for s in sizes), "mesh.data, mesh.fsdp and mesh.tensor must be >= 1 or -1.")
    ck = cfg.checkpoint
    check(ck.keep >= 1, "checkpoint.keep must be >= 1.")
    check(ck.every_steps is None or ck.every_steps >= 1, "checkpoint.every_steps must be >= 1 (or null).")
    check(ck.every_minutes is None or ck.every_minutes > 0, "checkpoint.every_minutes must be > 0 (or null: no time-based saves).")
    g = cfg.generation
    check(g.temperature > 0, "generation.temperature must be > 0 (use do_sample=false for greedy).")
    check(0.0 < g.top_p <= 1.0, "generation.top_p must be in (0, 1].")
    check(g.top_k >= 0, "generation.top_k must be >= 0 (0 disables it).")


def _check_objective(o, model) -> None:
    check(0.0 <= o.alpha <= 1.0, f"objective.alpha={o.alpha} must be in [0, 1].")
    for name in ("transform_variance_priority", "transform_strength_priority", "weight"):
        check(getattr(o, name) >= 0, f"objective.{name} must be >= 0.")
    check(o.adversary_weight >= 0, "objective.adversary_weight must be >= 0.")
    check(o.adversary_learning_rate > 0, "objective.adversary_learning_rate must be > 0.")
    check(o.adversary_steps >= 1, "objective.adversary_steps must be >= 1.")
    check(o.adversary_reset_every >= 0, "objective.adversary_reset_every must be >= 0 (0: never re-initialised).")
    check(o.adversary_reset_steps >= 0, "objective.adversary_reset_steps must be >= 0.")
    check(o.adversary_reset_every == 0 or o.adversary != "off",
          "objective.adversary_reset_every needs an adversary: set objective.adversary=mlp (or transformer).")
    check(o.posterior_weight >= 0, "objective.posterior_weight must be >= 0 (0: no posterior penalty).")
    check(o.posterior_candidates >= 2, "objective.posterior_candidates must be >= 2 (the true token and another).")
    check(o.posterior_positions >= 1, "objective.posterior_positions must be >= 1 (sampled positions per example).")
    check(o.mode == "ssl" or model.truncate_at_layer is None,
          f"model.truncate_at_layer={model.truncate_at_layer} only applies to objective.mode=ssl; "
          f"mode {o.mode!r} needs the whole model (set model.truncate_at_layer=null).")
