"""TransformerCloak: the Stained Glass Transform itself (float32, explicit PRNG keys).

For input embeddings ``x`` (B, S, D)::

    mu    = mean_head(dropout(mean_estimator(x)))
    sigma = std_param(std_head(dropout(std_estimator(x))))
    x_t   = where(noise_mask & attention_mask, x + mu + sigma * eps, x),   eps ~ N(0, I)

(with ``mean_bound`` b > 0, mu is first scaled to at most b noise units: :func:`bounded_mean`).

Each estimator is a :class:`~sgt_jax.models.decoder.DecoderStack` of the base model's family and width
(built from ``config_path``'s ``config.json``; one layer unless ``num_hidden_layers`` is passed), with the
final norm like a Hugging Face ``*Model``. Everything is float32 and stays float32: the recommendations are explicit
that the transform must run in single precision, and a downcast after the fact must fail loudly at call
time rather than train or serve a silently degraded transform.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import FrozenDict

from sgt_jax.config import CloakConfig, check_cloak
from sgt_jax.errors import SGTError
from sgt_jax.models.decoder import DecoderConfig, DecoderStack
from sgt_jax.models.hf import resolve_model_path
from sgt_jax.transform.entropy import fresh_key

__all__ = [
    "CloakConfigError",
    "CloakOutput",
    "TransformerCloak",
    "normalize_transformer_type",
    "scale_from_embeddings",
    "straight_through_clip",
    "num_masked_features",
    "bounded_mean",
]


class CloakConfigError(SGTError):
    """A user-caused cloak problem (setting, dtype, family); the one-line message names the fix."""


class CloakOutput(NamedTuple):
    x_t: jax.Array  # (B, S, D) float32 transformed embeddings
    mu: jax.Array  # (B, S, D) deterministic part
    sigma: jax.Array  # (B, S, D) noise scale, in [min_scale, max_scale]
    feature_mask: Optional[jax.Array]  # (B, S, D) bool, features replaced by mu; None when percent_to_mask == 0
    aux_loss: jax.Array  # () MoE load-balancing loss summed over both estimators (0 without experts)


def normalize_transformer_type(name: str) -> str:
    """'llama', 'LlamaModel', 'transformers.MistralModel', 'Qwen2ForCausalLM' → 'llama' / 'mistral' / 'qwen2'."""
    base = str(name).strip().split(".")[-1].lower()
    for suffix in ("forcausallm", "model", "config"):
        if base.endswith(suffix) and len(base) > len(suffix):
            base = base[: -len(suffix)]
            break
    return base


def scale_from_embeddings(embedding_table) -> Tuple[float, float]:
    """The recommendations' rule of thumb for ``scale``, read off the base model's embedding table (V, D).

    min_scale = 0.1 × the smallest per-feature standard deviation over the vocabulary;
    max_scale = 10 × the largest absolute value of any feature of any token.

    Why these statistics: the recommendations say min ≈ 10× below "the minimum value of all features" and max ≈ 10×
    above "the maximum". Read literally, the minimum *absolute* entry of a real table is ~0 (or exactly 0),
    which would give a useless or invalid min_scale; the quietest feature's spread is the smallest scale at
    which noise still moves a feature relative to how it varies between tokens. The largest absolute entry
    is well defined and bounds how far the noise may reach. Constant (zero-spread) features are ignored.
    """
    table = np.asarray(jax.device_get(embedding_table), dtype=np.float64)
    if table.ndim != 2:
        raise CloakConfigError(f"scale_from_embeddings needs a (vocab, hidden) table, got shape {table.shape}.")
    stds = table.std(axis=0)
    stds = stds[stds > 0]
    if stds.size == 0:
        raise CloakConfigError("the embedding table has no varying feature; pass cloak.scale explicitly.")
    return float(0.1 * stds.min()), float(10.0 * np.abs(table).max())


# Below this fraction of max_scale the sigma gradient passes in log space (see straight_through_clip).
LOG_SPACE_FRACTION = 0.1


@jax.custom_vjp
def _st_clip(h, lo, hi, ref):
    return jnp.clip(h, lo, hi)


def _st_clip_fwd(h, lo, hi, ref):
    sigma = jnp.clip(h, lo, hi)
    return sigma, (h, lo, hi, ref, sigma)


def _st_clip_bwd(res, g):
    h, lo, hi, ref, sigma = res
    grad = g * jnp.minimum(sigma / ref, 1.0)
    # Outside the bounds the forward value does not move: pass only the part of the gradient whose descent
    # step brings the head back (a descent step is -grad), never one that drives it further out.
    grad = jnp.where(h > hi, jnp.maximum(grad, 0.0), grad)
    grad = jnp.where(h < lo, jnp.minimum(grad, 0.0), grad)
    zero = jnp.zeros((), h.dtype)
    return grad, zero, zero, zero


_st_clip.defvjp(_st_clip_fwd, _st_clip_bwd)


def straight_through_clip(h: jax.Array, lo: float, hi: float) -> jax.Array:
    """clip(h, lo, hi) forward; backward: dsigma/dh := min(1, sigma / ref), ref = LOG_SPACE_FRACTION · hi,
    and outside [lo, hi] only the part of the gradient that moves the head back inside.

    Why not a plain clip: the directly-learned parameterisation starts with the head at ~0 (rho_init = 0),
    i.e. below or just above min_scale; a plain clip is saturated below with zero gradient, so sigma could
    never grow (a dead transform).
    Why not a plain straight-through (identity) either: dL_N/dsigma = -1/sigma is unbounded as sigma nears a
    small floor (-1e8 per element at min_scale = 1e-8; with rho_init = 0 about half of the head starts just
    above it). A handful of such elements then dominate the global gradient norm, the norm clip scales every
    utility gradient to nothing, and training follows L_N blindly. Below ``ref`` the rule passes
    ``(sigma / ref) · dL/dsigma = dL/d(log sigma) / ref``: a straight-through in log space, where L_N pushes
    every element equally (-1/ref, whatever min_scale is) and the utility keeps its sign and relative weight
    per element. Above ``ref`` it is the exact gradient of the clip; the two agree at ``ref``.
    ``ref`` is tied to max_scale (≈ 10× the largest embedding feature by the rule of thumb), i.e. to the
    embeddings' scale rather than to a floor that only marks "no noise".
    Outside the bounds: a gradient that would push the head further out changes nothing in the forward, yet
    Adam's normalised steps would let the head drift without bound; it is dropped.
    A custom VJP (not ``h + stop_gradient(clip(h) - h)``) keeps the forward value *exactly* the clip: in
    float32 ``-0.5 + (1e-8 + 0.5)`` rounds to 0, which would make log(sigma) = -inf.
    """
    dtype = h.dtype
    return _st_clip(h, jnp.asarray(lo, dtype), jnp.asarray(hi, dtype),
                    jnp.asarray(max(LOG_SPACE_FRACTION * hi, lo), dtype))


def bounded_mean(mu: jax.Array, sigma: jax.Array, bound: float) -> jax.Array:
    """mu scaled so that its length in noise units r = ||mu / sigma|| (over the last axis) becomes
    bound · tanh(r / bound) < bound: a token's transformed mean then moves at most ``bound`` noise standard
    deviations from x, in any direction (those that separate it from its neighbours included), so two tokens'
    means differ by at most their embeddings' distance plus 2 · bound in noise units. Smooth, and the identity
    to first order while r << bound."""
    r = jnp.sqrt(jnp.sum(jnp.square(mu / sigma), axis=-1, keepdims=True) + 1e-12)
    return mu * (bound * jnp.tanh(r / bound) / r)


def num_masked_features(percent_to_mask: float, hidden_size: int) -> int:
    """round(p · D), halves rounded up (static: it fixes the top-k size)."""
    return int(math.floor(percent_to_mask * hidden_size + 0.5))


def _dropout(key, h, rate):
    keep = jax.random.bernoulli(key, 1.0 - rate, h.shape)
    return jnp.where(keep, h / (1.0 - rate), jnp.zeros_like(h))


def _checked_model_type(config_path, transformer_type: Optional[str]) -> str:
    """The model_type of config_path's config.json, which a given transformer_type must name."""
    path = Path(config_path)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise CloakConfigError(
            f"cloak.config_path={str(config_path)!r} has no config.json; point it at the base model's directory."
        )
    model_type = str(json.loads(path.read_text()).get("model_type"))
    if transformer_type is not None and normalize_transformer_type(transformer_type) != model_type:
        raise CloakConfigError(
            f"cloak.transformer_type={transformer_type!r} does not match the {model_type!r} model at "
            f"config_path={str(config_path)!r}; set transformer_type={model_type!r} (or leave it unset)."
        )
    return model_type


class TransformerCloak(nnx.Module):
    """The SGT: two float32 decoder-stack estimators (mean, std) + their ``Dense(D, D)`` heads.

    Arguments follow the recommendations; ``**kwargs`` override the estimators' decoder config
    (``num_hidden_layers`` defaults to 1). ``rngs`` only initialises parameters; noise and dropout come from
    the key passed to ``__call__``.
    """

    def __init__(
        self,
        scale: Optional[Sequence[float]] = None,
        transformer_type: Optional[str] = None,
        config_path: Optional[str | os.PathLike] = None,
        percent_to_mask: float = 0.0,
        shallow: float = 1.0,
        seed: Optional[int] = None,
        rho_init: Optional[float] = None,
        std_dropout: float = 0.1,
        mean_dropout: float = 0.1,
        directly_learn_stds: bool = True,
        mean_num_experts: int = 0,
        std_num_experts: int = 0,
        use_causal_mask: bool = True,
        mean_bound: float = 0.0,
        *,
        remat_policy: str = "none",
        matmul_precision: str = "highest",
        rngs: Optional[nnx.Rngs] = None,
        **kwargs: Any,
    ):
        if config_path is None:
            raise CloakConfigError("cloak.config_path is required: the base model's directory with config.json.")
        check_cloak(CloakConfig(
            scale=None if scale is None else list(scale), transformer_type=transformer_type,
            config_path=str(config_path), percent_to_mask=percent_to_mask, shallow=shallow, seed=seed,
            rho_init=rho_init, std_dropout=std_dropout, mean_dropout=mean_dropout,
            directly_learn_stds=directly_learn_stds, mean_num_experts=mean_num_experts, std_num_experts=std_num_experts,
            use_causal_mask=use_causal_mask, mean_bound=mean_bound, estimator_kwargs=kwargs, remat_policy=remat_policy,
            matmul_precision=matmul_precision), CloakConfigError)
        if scale is None:
            scale = (1e-8, 1.0) if directly_learn_stds else (1e-3, 1.0)
        if rho_init is None:
            rho_init = 0.0 if directly_learn_stds else -3.0
        config_path = resolve_model_path(config_path)
        self.transformer_type = _checked_model_type(config_path, transformer_type)
        self.min_scale, self.max_scale = (float(s) for s in scale)
        self.config_path = str(config_path)
        self.percent_to_mask = float(percent_to_mask)
        self.shallow = float(shallow)
        self.seed = None if seed is None else int(seed)
        self.rho_init = float(rho_init)
        self.std_dropout, self.mean_dropout = float(std_dropout), float(mean_dropout)
        self.directly_learn_stds = bool(directly_learn_stds)
        self.mean_num_experts, self.std_num_experts = int(mean_num_experts), int(std_num_experts)
        self.use_causal_mask = bool(use_causal_mask)
        self.mean_bound = float(mean_bound)
        # frozen (hashable): jitted functions of this package take the cloak's graph definition as a static argument
        self.estimator_kwargs = FrozenDict({"num_hidden_layers": 1, **kwargs})
        # remat_policy: a training-memory setting only (recompute the estimators' layer activations in the
        # backward instead of keeping them); the transform's values are the same under every policy.
        # matmul_precision: on a TPU a float32 dot runs by default as one bfloat16 pass (TF32 on recent GPUs);
        # "highest" makes every matmul of the transform, forward and backward, single precision.
        self.matmul_precision = matmul_precision
        self._build_layers(remat_policy, nnx.Rngs(0 if seed is None else int(seed)) if rngs is None else rngs)

    def _build_layers(self, remat_policy: str, rngs: nnx.Rngs) -> None:
        """The two float32 estimators (of the base's family, from config_path) and their heads."""
        try:
            # *_num_experts win over a num_experts in kwargs: they are the recommendations' named settings.
            mean_config, std_config = [
                DecoderConfig.from_hf(self.config_path, **{**self.estimator_kwargs, "num_experts": experts})
                for experts in (self.mean_num_experts, self.std_num_experts)]
        except ValueError as exc:
            raise CloakConfigError(f"cloak estimator config: {str(exc).splitlines()[0]}") from None
        hidden = mean_config.hidden_size
        self.hidden_size = hidden
        self.num_masked_features = num_masked_features(self.percent_to_mask, hidden)

        f32 = jnp.float32
        self.mean_estimator = DecoderStack(mean_config, dtype=f32, param_dtype=f32, final_norm=True,
                                           remat_policy=remat_policy, matmul_precision=self.matmul_precision,
                                           rngs=rngs)
        self.std_estimator = DecoderStack(std_config, dtype=f32, param_dtype=f32, final_norm=True,
                                          remat_policy=remat_policy, matmul_precision=self.matmul_precision,
                                          rngs=rngs)
        precision = jax.lax.Precision(self.matmul_precision)
        # mu = 0 at the start: the transform begins as "x plus small noise", never as a random remapping.
        self.mean_head = nnx.Linear(hidden, hidden, kernel_init=nnx.initializers.zeros_init(),
                                    bias_init=nnx.initializers.zeros_init(), dtype=f32, param_dtype=f32,
                                    precision=precision, rngs=rngs)
        # Near-zero weights so the head starts at rho_init for every token; scaled by 1/sqrt(D) because the
        # estimator output is RMS-normalised (norm ~ sqrt(D)), keeping the head's spread ~1e-3 at any width.
        # Not exactly zero, so tokens differ from the start; gradient reaches sigma either way (see
        # straight_through_clip / tanh).
        self.std_head = nnx.Linear(hidden, hidden, kernel_init=nnx.initializers.normal(1e-3 / math.sqrt(hidden)),
                                   bias_init=nnx.initializers.constant(self.rho_init), dtype=f32, param_dtype=f32,
                                   precision=precision, rngs=rngs)

    @classmethod
    def from_config(cls, cloak_cfg, model_path, *, rngs: Optional[nnx.Rngs] = None) -> "TransformerCloak":
        """Build from a :class:`sgt_jax.config.CloakConfig`; ``config_path`` defaults to ``model_path``
        (a directory or an ``embedded:<name>``)."""
        return cls(
            scale=None if cloak_cfg.scale is None else tuple(cloak_cfg.scale),
            transformer_type=cloak_cfg.transformer_type,
            config_path=cloak_cfg.config_path or model_path,
            percent_to_mask=cloak_cfg.percent_to_mask,
            shallow=cloak_cfg.shallow,
            seed=cloak_cfg.seed,
            rho_init=cloak_cfg.rho_init,
            std_dropout=cloak_cfg.std_dropout,
            mean_dropout=cloak_cfg.mean_dropout,
            directly_learn_stds=cloak_cfg.directly_learn_stds,
            mean_num_experts=cloak_cfg.mean_num_experts,
            std_num_experts=cloak_cfg.std_num_experts,
            use_causal_mask=cloak_cfg.use_causal_mask,
            mean_bound=cloak_cfg.mean_bound,
            remat_policy=cloak_cfg.remat_policy,
            matmul_precision=cloak_cfg.matmul_precision,
            rngs=rngs,
            **dict(cloak_cfg.estimator_kwargs or {}),
        )

    # ------------------------------------------------------------------------------------------ forward

    def sigma_from_head(self, head: jax.Array) -> jax.Array:
        """The std parameterisation: straight-through clip (directly_learn_stds) or the shifted tanh of rho."""
        if self.directly_learn_stds:
            return straight_through_clip(head, self.min_scale, self.max_scale)
        unit = (1.0 + jnp.tanh(head / self.shallow)) / 2.0
        return self.min_scale + (self.max_scale - self.min_scale) * unit

    def _check_float32(self, x: jax.Array) -> None:
        if jnp.asarray(x).dtype != jnp.float32:
            raise CloakConfigError(
                f"cloak input has dtype {jnp.asarray(x).dtype}; the SGT runs in float32 only: pass x.astype(float32)."
            )
        for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(self, nnx.Param)):
            if leaf.dtype != jnp.float32:
                name = ".".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)
                raise CloakConfigError(
                    f"cloak parameter {name} has dtype {leaf.dtype}; the SGT must stay float32 "
                    "(no downcast or quantisation): reload or cast the cloak's parameters back to float32."
                )

    def per_example_keys(self, key, batch_size: int, like: jax.Array) -> jax.Array:
        """(B,) typed per-example keys from a single key or from per-example keys (typed or raw uint32)."""
        if key is None:
            if self.seed is not None:
                key = jax.random.key(self.seed)
            else:
                if isinstance(like, jax.core.Tracer):
                    # Fresh entropy drawn while tracing would be baked into the compiled function as a constant.
                    raise CloakConfigError(
                        "cloak called under jit with key=None and seed=None; pass key= explicitly inside jit."
                    )
                key = fresh_key()
        key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
        if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key)
        if key.ndim == 0:
            return jax.random.split(key, batch_size)
        if key.shape != (batch_size,):
            raise ValueError(f"cloak key must be one key or one per example ({batch_size},), got shape {key.shape}.")
        return key

    def __call__(
        self,
        x: jax.Array,
        attention_mask: jax.Array,
        noise_mask: jax.Array,
        *,
        key: Optional[jax.Array] = None,
        deterministic: bool = False,
    ) -> CloakOutput:
        """Transform embeddings x (B, S, D) float32.

        key: one PRNG key, or one per example (B,) so that an example's noise does not depend on how the batch
        is split. None: from ``seed`` when it is an int (reproducible), else fresh OS entropy on every call.
        deterministic: dropout off (eval); noise is always on.
        """
        self._check_float32(x)
        batch = x.shape[0]
        keys = self.per_example_keys(key, batch, x)
        streams = jax.vmap(lambda k: jax.random.split(k, 3))(keys)  # (B, 3): noise, mean dropout, std dropout
        noise_keys, mean_keys, std_keys = streams[:, 0], streams[:, 1], streams[:, 2]

        attention_mask = attention_mask.astype(bool)
        selected = noise_mask.astype(bool) & attention_mask  # padding is never transformed

        mean_hidden, mean_aux = self.mean_estimator(x, attention_mask, causal=self.use_causal_mask)
        std_hidden, std_aux = self.std_estimator(x, attention_mask, causal=self.use_causal_mask)
        if not deterministic and self.mean_dropout > 0:
            mean_hidden = jax.vmap(_dropout, in_axes=(0, 0, None))(mean_keys, mean_hidden, self.mean_dropout)
        if not deterministic and self.std_dropout > 0:
            std_hidden = jax.vmap(_dropout, in_axes=(0, 0, None))(std_keys, std_hidden, self.std_dropout)
        mu = self.mean_head(mean_hidden)
        sigma = self.sigma_from_head(self.std_head(std_hidden))
        if self.mean_bound > 0:
            mu = bounded_mean(mu, sigma, self.mean_bound)

        eps = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], jnp.float32))(noise_keys)
        x_t = jnp.where(selected[..., None], x + mu + sigma * eps, x)

        feature_mask = None
        if self.percent_to_mask > 0:
            k = self.num_masked_features
            if k > 0:
                _, top = jax.lax.top_k(sigma, k)  # the k features with the largest sigma, per token
                chosen = jnp.zeros(sigma.shape, bool).at[
                    jnp.arange(batch)[:, None, None], jnp.arange(x.shape[1])[None, :, None], top
                ].set(True)
            else:
                chosen = jnp.zeros(sigma.shape, bool)
            feature_mask = chosen & selected[..., None]
            x_t = jnp.where(feature_mask, mu, x_t)
        return CloakOutput(x_t=x_t, mu=mu, sigma=sigma, feature_mask=feature_mask, aux_loss=mean_aux + std_aux)
