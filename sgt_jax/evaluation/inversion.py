"""Inversion attacks on transformed embeddings, independent of where the transform comes from.

A *transform* is any ``fn(input_ids, attention_mask, noise_mask, key) -> (x_t, sigma)`` (B, S, D) float32
(sigma may be None): a trained SGT, the identity, or plain Gaussian noise. The attacker

1. draws public prompts (:class:`PromptSet`), transforms them with a fresh key per batch *and epoch*, so an
   example never shows the same noise twice (:func:`noised_batches`);
2. trains a learned inverter on the (x_t, token) pairs at the noised positions (:func:`train_inverter`);
3. is scored on held-out prompts that it never trained on (:func:`assert_disjoint`): top-1 / top-5 token
   recovery over noised positions, per-sequence recovery quantiles, and the same attack on clean embeddings
   (the ceiling), next to the majority-token baseline (:func:`run_attacks`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sgt_jax.evaluation import metrics as metrics_lib
from sgt_jax.data.errors import DataError
from sgt_jax.transform.inverters import INVERTER_KINDS, inverter_logits, inverter_update, make_inverter
from sgt_jax.inference.generate import left_pad
from sgt_jax.transform.leakage import barber_agakov

__all__ = ["ATTACKS", "PromptSet", "assert_disjoint", "transform_from", "gaussian_transform", "noised_batches",
           "train_inverter", "learned_attack", "run_attacks", "majority_baseline"]

ATTACKS = ("nn",) + INVERTER_KINDS
Transform = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], tuple]


@dataclasses.dataclass
class PromptSet:
    """Left-padded prompts (N, L) int32: ids, attention mask, and the mask of positions the transform noises."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    noise_mask: np.ndarray

    @classmethod
    def from_prompts(cls, prompts: Sequence, pad_id: int, name: str) -> "PromptSet":
        prompts = [p for p in prompts if any((p["noise_mask"] if isinstance(p, dict) else [1]))]
        if not prompts:
            raise DataError(f"the attack's {name} data has no prompt with a transformed token; pass a non-empty "
                            f"--{name}-data in the run's data.format.")
        return cls(*left_pad(prompts, pad_id))

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def targets(self) -> np.ndarray:
        return (self.attention_mask & self.noise_mask).astype(bool)

    def keys(self) -> set:
        """One hashable key per prompt: its real tokens."""
        return {tuple(ids[m.astype(bool)].tolist()) for ids, m in zip(self.input_ids, self.attention_mask)}

    def without(self, other: "PromptSet") -> "PromptSet":
        """These prompts minus any that also occur in ``other``."""
        banned = other.keys()
        keep = [i for i, (ids, m) in enumerate(zip(self.input_ids, self.attention_mask))
                if tuple(ids[m.astype(bool)].tolist()) not in banned]
        return PromptSet(self.input_ids[keep], self.attention_mask[keep], self.noise_mask[keep])


def assert_disjoint(train: PromptSet, held_out: PromptSet) -> None:
    """The attacker never trains on a prompt it is evaluated on."""
    shared = train.keys() & held_out.keys()
    if shared:
        raise AssertionError(f"{len(shared)} evaluation prompt(s) are also in the attacker's training data.")


def transform_from(table: jax.Array, mu_sigma_fn) -> Transform:
    """The transform x_t = x + mu(x) + sigma(x) * eps at noised positions (clean elsewhere) of a deterministic
    part ``mu_sigma_fn(x, attention_mask, noise_mask) -> (mu, sigma)`` on embeddings x (B, S, D)."""
    table = jnp.asarray(table, jnp.float32)

    @jax.jit
    def apply(ids, attention_mask, noise_mask, key):
        x = table[ids]
        mu, sigma = mu_sigma_fn(x, attention_mask, noise_mask)
        noisy = x + mu + sigma * jax.random.normal(key, x.shape, jnp.float32)
        sel = (attention_mask.astype(bool) & noise_mask.astype(bool))[..., None]
        return jnp.where(sel, noisy, x), sigma

    return apply


def gaussian_transform(table: jax.Array, *, mu: float = 0.0, sigma: float = 0.0) -> Transform:
    """x_t = e + mu + sigma * eps at noised positions (clean elsewhere): identity for mu = sigma = 0."""
    return transform_from(table, lambda x, am, nm: (jnp.full(x.shape, mu, jnp.float32),
                                                    jnp.full(x.shape, sigma, jnp.float32)))


def noised_batches(data: PromptSet, transform: Transform, key: jax.Array, *, batch_size: int, steps: int,
                   seed: int = 0) -> Iterator[tuple[int, np.ndarray, dict]]:
    """``steps`` training batches: a fresh shuffle per epoch and a fresh noise key per (epoch, batch), so
    each example is transformed with new noise every time it is seen. Yields (epoch, row indices, batch)."""
    n = len(data)
    batch_size = min(batch_size, n)
    per_epoch = max(n // batch_size, 1)
    order = None
    for step in range(steps):
        epoch, b = divmod(step, per_epoch)
        if b == 0 or order is None:
            order = np.random.default_rng([seed, epoch]).permutation(n)
        rows = order[b * batch_size:(b + 1) * batch_size]
        ids, am, nm = data.input_ids[rows], data.attention_mask[rows], data.noise_mask[rows]
        x_t, _ = transform(ids, am, nm, _batch_key(key, epoch, b))
        yield epoch, rows, {"x_t": x_t, "input_ids": ids, "attention_mask": am, "target_mask": (am & nm).astype(bool)}


@jax.jit
def _batch_key(key, epoch, index):
    return jax.random.fold_in(jax.random.fold_in(key, epoch), index)


def train_inverter(kind: str, transform: Transform, data: PromptSet, *, hidden_size: int, vocab_size: int,
                   steps: int, key: jax.Array, batch_size: int = 32, learning_rate: float = 1e-3,
                   max_length: Optional[int] = None,
                   on_step: Optional[Callable[[int, float], None]] = None) -> tuple[nnx.GraphDef, nnx.State]:
    """Train a ``kind`` inverter (mlp | transformer) for ``steps`` Adam steps on noised public prompts
    (``max_length``: the longest sequence the transformer inverter will read, default the data's); returns its
    graph definition and trained state."""
    init_key, noise_key = jax.random.split(key)
    kwargs = {"max_length": int(max_length or data.input_ids.shape[1])} if kind == "transformer" else {}
    graphdef, params = nnx.split(make_inverter(kind, hidden_size, vocab_size, nnx.Rngs(init_key), **kwargs))
    warmup = max(1, min(100, steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(steps, warmup + 1),
                                                  learning_rate * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    opt_state = tx.init(params)
    for step, (_, _, batch) in enumerate(noised_batches(data, transform, noise_key, batch_size=batch_size,
                                                        steps=steps)):
        if kind == "mlp":  # per position: train on the noised positions only (a fraction of each prompt)
            batch = _target_positions(batch, slots=16 * batch_size)
        params, opt_state, loss, _ = _inverter_step(graphdef, tx, params, opt_state, batch["x_t"], batch["input_ids"],
                                                batch["target_mask"], batch["attention_mask"])
        if on_step is not None:
            on_step(step + 1, loss)
    return graphdef, params


_inverter_step = jax.jit(inverter_update, static_argnums=(0, 1), donate_argnums=(2, 3))


def _target_positions(batch: dict, slots: int) -> dict:
    """The batch's noised positions as one (1, slots) row (extra slots masked out, surplus dropped at random)."""
    rows, cols = np.nonzero(batch["target_mask"])
    if len(rows) > slots:
        keep = np.random.default_rng(len(rows)).choice(len(rows), slots, replace=False)
        rows, cols = rows[keep], cols[keep]
    valid = np.zeros((1, slots), bool)
    valid[0, :len(rows)] = True
    rows, cols = np.pad(rows, (0, slots - len(rows))), np.pad(cols, (0, slots - len(cols)))
    return {"x_t": _gather(batch["x_t"], rows, cols)[None], "input_ids": batch["input_ids"][rows, cols][None],
            "target_mask": valid, "attention_mask": valid}


@jax.jit
def _gather(x_t, rows, cols):
    return x_t[rows, cols]


@functools.partial(jax.jit, static_argnums=0)
def _inverter_ranks(graphdef, params, x_t, ids, attention_mask):
    """(rank of the true token, its log-probability) under the inverter, per position."""
    logits = inverter_logits(nnx.merge(graphdef, params), x_t, attention_mask)
    true = jnp.take_along_axis(logits, ids[..., None], axis=-1)
    log_q = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), ids[..., None], axis=-1)[..., 0]
    return jnp.sum(logits > true, axis=-1), log_q


def _nn_ranks(table, metric):
    @jax.jit
    def ranks(x_t, ids):
        return metrics_lib.nearest_tokens(x_t, table, metric=metric, true_ids=ids)[1]

    return lambda x_t, ids, attention_mask: ranks(x_t, ids)


def _eval_batches(data: PromptSet, transform: Optional[Transform], table, key, batch_size: int):
    """Fixed-shape evaluation batches (the last one padded with empty rows); x_t with a fixed key per batch,
    or the clean embeddings when ``transform`` is None."""
    n = len(data)
    for b, start in enumerate(range(0, n, batch_size)):
        rows = np.arange(start, start + batch_size) % n
        real = np.arange(start, start + batch_size) < n
        ids, am, nm = (jnp.asarray(a[rows]) for a in (data.input_ids, data.attention_mask, data.noise_mask))
        if transform is None:
            x_t, sigma = jnp.asarray(table)[ids].astype(jnp.float32), None
        else:
            x_t, sigma = transform(ids, am, nm, jax.random.fold_in(key, b))
        yield real, ids, am, data.targets[rows] & real[:, None], x_t, sigma


def score(rank_fn, data: PromptSet, transform: Optional[Transform], table, key, batch_size: int = 64) -> dict:
    """top-1 / top-5 recovery (%) over the noised positions and per-sequence top-1 recovery quantiles; when
    ``rank_fn`` also returns the attacker's log-probability of the true token, its Barber–Agakov bound
    (``leakage``: bits per noised token, see :mod:`sgt_jax.transform.leakage`)."""
    hit1, hit5, count, per_seq, log_q, truth = 0.0, 0.0, 0.0, [], [], []
    for real, ids, am, targets, x_t, _ in _eval_batches(data, transform, table, key, batch_size):
        out = rank_fn(x_t, ids, am)
        rank = np.asarray(out[0] if isinstance(out, tuple) else out)
        if isinstance(out, tuple):
            log_q.append(np.asarray(out[1])[targets])
            truth.append(np.asarray(ids)[targets])
        hit1 += float(((rank == 0) & targets).sum())
        hit5 += float(((rank < 5) & targets).sum())
        count += float(targets.sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            seq = 100.0 * ((rank == 0) & targets).sum(-1) / targets.sum(-1)
        per_seq.append(seq[real])
    out = {"top1": 100.0 * hit1 / count, "top5": 100.0 * hit5 / count, "positions": int(count),
           "per_sequence_top1": metrics_lib.summarize(np.concatenate(per_seq))}
    if log_q:
        out["leakage"] = barber_agakov(np.concatenate(log_q), np.concatenate(truth))
    return out


def majority_baseline(train: PromptSet, held_out: PromptSet) -> dict:
    """Recovery (%) of always answering the training data's most frequent noised token(s)."""
    counts = np.bincount(train.input_ids[train.targets])
    top = np.argsort(-counts, kind="stable")[:5]
    truth = held_out.input_ids[held_out.targets]
    return {"top1": 100.0 * float(np.mean(truth == top[0])), "top5": 100.0 * float(np.mean(np.isin(truth, top))),
            "token": int(top[0])}


def run_attacks(transform: Transform, table, train: PromptSet, held_out: PromptSet, *,
                attacks: Sequence[str] = ATTACKS, steps: int = 1500, batch_size: int = 32, key: jax.Array,
                ceiling: bool = True, learning_rates: Optional[dict] = None,
                on_step: Optional[Callable[[str, int, float], None]] = None) -> dict:
    """Every attack in ``attacks`` against ``transform``; ``ceiling`` also scores each on clean embeddings
    (learned attacks trained again on clean embeddings). Returns the report's ``attacks`` section."""
    assert_disjoint(train, held_out)
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise DataError(f"--attacks {unknown[0]!r} is unknown; choose from {', '.join(ATTACKS)}.")
    table = jnp.asarray(table, jnp.float32)
    vocab, dim = table.shape
    lrs = {"mlp": 1e-3, "transformer": 1e-3, **(learning_rates or {})}
    eval_key = jax.random.fold_in(key, 7)
    identity = gaussian_transform(table)
    out: dict = {"majority_baseline": majority_baseline(train, held_out)}
    max_length = max(train.input_ids.shape[1], held_out.input_ids.shape[1])
    for index, attack in enumerate(attacks):
        if attack == "nn":
            for metric in ("cosine", "l2"):
                ranks = _nn_ranks(table, metric)
                res = score(ranks, held_out, transform, table, eval_key)
                if ceiling:
                    res["clean"] = _brief(score(ranks, held_out, None, table, eval_key))
                out[f"nn_{metric}"] = res
            continue
        models = {"x_t": transform, "clean": identity} if ceiling else {"x_t": transform}
        for j, (which, tf) in enumerate(models.items()):
            report = None if on_step is None else (lambda s, loss, name=f"{attack}/{which}": on_step(name, s, loss))
            res = learned_attack(attack, tf, tf if which == "x_t" else None, table, train, held_out, steps=steps,
                                 key=jax.random.fold_in(key, 2 * index + j), eval_key=eval_key,
                                 max_length=max_length, batch_size=batch_size, learning_rate=lrs[attack],
                                 on_step=report)
            if which == "x_t":
                out[attack] = res
            else:
                out[attack]["clean"] = _brief(res)
    return out


def learned_attack(kind: str, train_transform: Transform, eval_transform: Optional[Transform], table,
                   train: PromptSet, held_out: PromptSet, *, steps: int, key, eval_key, batch_size: int = 32,
                   learning_rate: float = 1e-3, max_length: Optional[int] = None,
                   on_step: Optional[Callable[[int, float], None]] = None) -> dict:
    """A ``kind`` inverter trained on ``train`` under ``train_transform`` and scored on ``held_out`` under
    ``eval_transform`` (None: clean embeddings). The white-box attack uses the victim's transform for both;
    the server's transfer attack trains on its own SGT and reads the victim's."""
    assert_disjoint(train, held_out)
    table = jnp.asarray(table, jnp.float32)
    vocab, dim = table.shape
    graphdef, params = train_inverter(kind, train_transform, train, hidden_size=dim, vocab_size=vocab, steps=steps,
                                      key=key, max_length=max_length, batch_size=batch_size,
                                      learning_rate=learning_rate, on_step=on_step)
    rank_fn = lambda x_t, ids, am: _inverter_ranks(graphdef, params, x_t, ids, am)  # noqa: E731
    return score(rank_fn, held_out, eval_transform, table, eval_key)


def _brief(res: dict) -> dict:
    return {"top1": res["top1"], "top5": res["top5"]}
