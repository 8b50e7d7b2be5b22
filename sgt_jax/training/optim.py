"""AdamW for the cloak: masked weight decay, warm-up + decay schedules, global-norm clipping.

The recommendations' (docs/recipe.md) one critical exception to "use the base model's pre-training optimizer settings": the final
linear layers of the mean and std estimators (our ``mean_head`` / ``std_head``, weights *and* biases) must
get zero weight decay. Decay there pulls mu back to 0 and sigma back to the clip floor every step, which
"significantly hampers the ability of the model to learn meaningful transformations".

Only the cloak's parameters are ever handed to :func:`make_optimizer`'s ``init``; the frozen base model is
an argument of the train step, never in the optimizer state.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import optax

from sgt_jax.config import OptimizerConfig

__all__ = ["HEAD_NAMES", "decay_mask", "make_schedule", "make_optimizer", "path_names"]

# Module attribute names of the estimator heads (see sgt_jax.transform.cloak.TransformerCloak).
HEAD_NAMES = ("mean_head", "std_head")


def path_names(path: Iterable[Any]) -> tuple:
    """The plain names along a pytree key path (DictKey, GetAttrKey, SequenceKey, FlattenedIndexKey)."""
    names = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                names.append(getattr(entry, attr))
                break
        else:  # pragma: no cover - unknown key type
            names.append(str(entry))
    return tuple(names)


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: every leaf except those under ``mean_head`` / ``std_head``.

    Works on an ``nnx.State`` (leaves wrapped in ``nnx.Param``; the mask keeps that structure, which is what
    ``optax.masked`` needs), on ``state.to_pure_dict()`` and on any nested dict/list pytree.
    """

    def leaf(path, _):
        return not any(name in HEAD_NAMES for name in path_names(path))

    return jax.tree_util.tree_map_with_path(leaf, params)


def make_schedule(opt_cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to ``learning_rate``, then cosine / linear decay to ``end_lr_ratio * lr``
    at ``total_steps`` (or constant)."""
    lr = float(opt_cfg.learning_rate)
    end_lr = lr * float(opt_cfg.end_lr_ratio)
    total_steps = max(int(total_steps), 1)
    warmup = min(max(int(opt_cfg.warmup_steps), 0), total_steps)
    decay_steps = max(total_steps - warmup, 1)
    if opt_cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=end_lr / lr if lr else 0.0)
    elif opt_cfg.schedule == "linear":
        after = optax.linear_schedule(lr, end_lr, decay_steps)
    else:  # constant (the schema admits these three)
        after = optax.constant_schedule(lr)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(
    opt_cfg: OptimizerConfig,
    total_steps: int,
    *,
    mask: Callable[[Any], Any] = decay_mask,
) -> optax.GradientTransformation:
    """clip_by_global_norm(max_grad_norm) → AdamW(schedule, b1, b2, eps, weight_decay masked off the heads).

    ``init`` takes the cloak's parameters only (``nnx.state(cloak, nnx.Param)``), never the base model's.
    """
    schedule = make_schedule(opt_cfg, total_steps)
    return optax.chain(
        optax.clip_by_global_norm(float(opt_cfg.max_grad_norm)),
        optax.adamw(
            schedule,
            b1=float(opt_cfg.b1),
            b2=float(opt_cfg.b2),
            eps=float(opt_cfg.eps),
            weight_decay=float(opt_cfg.weight_decay),
            mask=mask,
        ),
    )
