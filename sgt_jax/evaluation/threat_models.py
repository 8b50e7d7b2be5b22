"""The three attackers an SGT is measured against, one report section each (``python -m sgt_jax.attack``).

- ``lookup``: the nearest vocabulary embedding of x_t (cosine, L2): no training, the weakest reader.
- ``white-box``: the attacker holds the SGT artifact and the embedding table (an artifact shipped to many
  clients leaks) and transforms public text at will: learned inverters (``mlp``, ``transformer``) trained on
  (x_t, token) pairs, and the exact-channel figure (each candidate token read with its own transformed mean).
- ``server``: the party that hosts the base model sees x_t, holds the base model and its embedding table,
  but not the SGT:
  - ``transfer``: it trains its own SGT with the same public recipe on public data disjoint from the
    victim's, trains the inverters on *that* SGT, and reads the victim's x_t with them;
  - ``reader``: it asks the base model to repeat the protected span (:mod:`sgt_jax.evaluation.reader`);
  - ``lm_prior``: it decodes with a noise model fitted from x_t and the base model as a language-model prior
    (:mod:`sgt_jax.evaluation.lm_prior`).

Each section lists its attacks' results, the strongest (by top-1 recovery) and, where an attacker gives a
probability for the true token, the largest Barber–Agakov bound (:mod:`sgt_jax.transform.leakage`).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgt_jax.config import commands
from sgt_jax.evaluation.inversion import PromptSet, Transform, learned_attack, run_attacks
from sgt_jax.evaluation.lm_prior import lm_prior_attack
from sgt_jax.evaluation.reader import reader_attack
from sgt_jax.transform import leakage

__all__ = ["THREAT_MODELS", "SERVER_ATTACKS", "section", "lookup", "white_box", "server", "exact_channel"]

THREAT_MODELS = tuple(commands.THREAT_MODELS.split(","))  # ("lookup", "white-box", "server")
SERVER_ATTACKS = tuple(commands.SERVER_ATTACKS.split(","))  # ("transfer", "reader", "lm_prior")


def section(attacks: dict) -> dict:
    """A threat model's report section: its attacks, the strongest by top-1 recovery, the largest bound."""
    strongest = max(attacks, key=lambda a: attacks[a]["top1"])
    out = {"attacks": attacks, "strongest": strongest, "recovery_top1": attacks[strongest]["top1"]}
    bounds = [(name, res["leakage"]) for name, res in attacks.items() if res.get("leakage")]
    if bounds:
        name, best = max(bounds, key=lambda item: item[1]["bits"])
        out["leakage"] = {**best, "attack": name}
    return out


def lookup(transform: Transform, table, train: PromptSet, held_out: PromptSet, *, key, ceiling: bool) -> dict:
    res = run_attacks(transform, table, train, held_out, attacks=("nn",), key=key, ceiling=ceiling)
    return section({name: res[name] for name in ("nn_cosine", "nn_l2")})


def white_box(transform: Transform, cloak, table, train: PromptSet, held_out: PromptSet, *, inverters: Sequence[str],
              steps: int, batch_size: int, key, ceiling: bool, on_step=None, exact_positions: int = 256,
              exact_candidates: int = 32) -> dict:
    res = run_attacks(transform, table, train, held_out, attacks=tuple(inverters), steps=steps, batch_size=batch_size,
                      key=key, ceiling=ceiling, on_step=on_step)
    out = section({name: res[name] for name in inverters})
    if exact_positions:
        out["exact_channel"] = exact_channel(cloak, transform, table, held_out, key=jax.random.fold_in(key, 13),
                                             positions=exact_positions, candidates=exact_candidates)
    return out


def server(transform: Transform, table, train: PromptSet, held_out: PromptSet, *, key, attacks: Sequence[str],
           base_model=None, tokenizer=None, data_format: str = "alpaca", attacker_transform: Optional[Transform] = None,
           attacker_train: Optional[PromptSet] = None, inverters: Sequence[str] = ("mlp",), steps: int = 1500,
           batch_size: int = 32, ceiling: bool = True, on_step=None) -> dict:
    """The server's attacks on ``held_out`` under the victim's ``transform``. ``transfer`` trains on
    ``attacker_train`` under ``attacker_transform`` (the attacker's own SGT); ``reader`` and ``lm_prior`` use
    ``base_model`` (the whole base model) and its ``tokenizer``."""
    results = {}
    eval_key = jax.random.fold_in(key, 7)
    if "transfer" in attacks:
        if attacker_transform is None or attacker_train is None:
            raise ValueError("the transfer attack needs the attacker's own SGT and its public prompts.")
        for index, kind in enumerate(inverters):
            report = None if on_step is None else (lambda s, loss, name=f"transfer_{kind}": on_step(name, s, loss))
            results[f"transfer_{kind}"] = learned_attack(
                kind, attacker_transform, transform, table, attacker_train.without(held_out), held_out, steps=steps,
                key=jax.random.fold_in(key, 100 + index), eval_key=eval_key, batch_size=batch_size,
                max_length=max(attacker_train.input_ids.shape[1], held_out.input_ids.shape[1]), on_step=report)
    if "reader" in attacks:
        results["reader"] = reader_attack(base_model, tokenizer, data_format, transform, table, train, held_out,
                                          key=eval_key, ceiling=ceiling)
    if "lm_prior" in attacks:
        results["lm_prior"] = lm_prior_attack(base_model, transform, table, held_out, key=eval_key)
    return section(results)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_candidates"))
def _exact_chunk(graphdef, state, table, ids, attention_mask, noise_mask, x_t, rows, cols, num_candidates: int):
    cloak = nnx.merge(graphdef, state)

    def mu_sigma(x, am, nm):
        out = cloak(x, am, nm, key=jax.random.key(0), deterministic=True)  # mu and sigma only: no noise used
        return out.mu, out.sigma

    return leakage.candidate_figure(mu_sigma, table, ids, attention_mask, noise_mask, x_t, rows, cols,
                                    num_candidates=num_candidates)[0]


def exact_channel(cloak, transform: Transform, table, data: PromptSet, *, key, positions: int = 256,
                  candidates: int = 32, chunk: int = 16) -> Optional[dict]:
    """The candidate-mean figure of :mod:`sgt_jax.transform.leakage` on up to ``positions`` transformed positions
    of ``data`` (a seeded sample), ``candidates`` tokens each: a Barber–Agakov figure (bits per noised token,
    against the entropy of all of ``data``'s noised tokens) of a reader that knows the SGT exactly and the
    context; it errs toward more leakage. None for a cloak with ``percent_to_mask`` > 0 (those features carry
    mu alone, no Gaussian)."""
    if getattr(cloak, "percent_to_mask", 0.0) > 0:
        return None
    ids, am, nm = (jnp.asarray(a) for a in (data.input_ids, data.attention_mask, data.noise_mask))
    x_t, _ = transform(ids, am, nm, key)
    rows, cols = np.nonzero(data.targets)
    pick = np.random.default_rng(0).permutation(len(rows))[:positions]
    rows, cols = rows[pick], cols[pick]
    table = jnp.asarray(table, jnp.float32)
    k = min(candidates, table.shape[0])
    log_q, (graphdef, state) = [], nnx.split(cloak)
    for start in range(0, len(rows), chunk):
        index = np.arange(start, start + chunk) % len(rows)  # one compiled shape: wrap the last chunk
        out = _exact_chunk(graphdef, state, table, ids, am, nm, x_t, jnp.asarray(rows[index]),
                           jnp.asarray(cols[index]), k)
        log_q.append(np.asarray(out)[: len(rows) - start])
    figure = leakage.barber_agakov(np.concatenate(log_q), data.input_ids[rows, cols],
                                   reference_ids=data.input_ids[data.targets])
    return {**figure, "candidates": int(k)}
