"""The SGT artifact: what a client needs to protect prompts, as safetensors + JSON (no pickle anywhere).

Layout of an artifact directory::

    sgt_config.json        format version, cloak hyperparameters, base model family/fingerprint, tokenizer info
    cloak.safetensors      the cloak's float32 parameters, named by their module path (e.g. std_head.kernel)
    embeddings.safetensors the base model's input embedding table (the client embeds with it)
    base_config/config.json the base model's Hugging Face config (the estimators are built from it)
    tokenizer/             the base model's tokenizer files

``StainedGlassTransform.load(dir)`` rebuilds the cloak and ``.transform(texts or ids)`` returns protected
embeddings, with fresh OS entropy for the noise on every call unless a key (or the artifact's debug seed)
is given.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

FORMAT_VERSION = 1
CONFIG_NAME = "sgt_config.json"
WEIGHTS_NAME = "cloak.safetensors"
EMBEDDINGS_NAME = "embeddings.safetensors"


class ArtifactError(ValueError):
    """A missing or malformed artifact; one line naming the path and the fix."""


def _flatten(state) -> dict[str, np.ndarray]:
    flat = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        name = ".".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)
        flat[name] = np.asarray(leaf)
    return flat


def _cloak_hyperparameters(cloak) -> dict[str, Any]:
    return {
        "scale": [cloak.min_scale, cloak.max_scale],
        "transformer_type": cloak.transformer_type,
        "percent_to_mask": cloak.percent_to_mask,
        "shallow": cloak.shallow,
        "seed": cloak.seed,
        "rho_init": cloak.rho_init,
        "std_dropout": cloak.std_dropout,
        "mean_dropout": cloak.mean_dropout,
        "directly_learn_stds": cloak.directly_learn_stds,
        "mean_num_experts": cloak.mean_num_experts,
        "std_num_experts": cloak.std_num_experts,
        "use_causal_mask": cloak.use_causal_mask,
        "estimator_kwargs": dict(cloak.estimator_kwargs),
    }


def save_artifact(
    out_dir, *, params, cloak_config, model_dir, fingerprint: str, tokenizer=None,
    training_config: Optional[Mapping[str, Any]] = None, embedding_table: Optional[np.ndarray] = None,
) -> Path:
    """Write the artifact for cloak ``params`` (an nnx State) built per ``cloak_config`` on ``model_dir``."""
    from sgt_jax.cloak import TransformerCloak
    from sgt_jax.models.hf import SafetensorsReader

    out = Path(out_dir)
    model_dir = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "base_config").mkdir(exist_ok=True)
    shutil.copy(model_dir / "config.json", out / "base_config" / "config.json")
    cloak = nnx.eval_shape(lambda: TransformerCloak.from_config(cloak_config, str(model_dir)))
    save_file(_flatten(params), str(out / WEIGHTS_NAME))
    if embedding_table is None:
        embedding_table = SafetensorsReader(model_dir).read("model.embed_tokens.weight")
    save_file({"embed_tokens": np.asarray(embedding_table)}, str(out / EMBEDDINGS_NAME))
    tokenizer_info = None
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out / "tokenizer"))
        tokenizer_info = {
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, "padding_side": tokenizer.padding_side,
            "vocab_size": len(tokenizer),
        }
    base_hf = json.loads((model_dir / "config.json").read_text())
    meta = {
        "format_version": FORMAT_VERSION,
        "cloak": _cloak_hyperparameters(cloak),
        "base_model": {"model_type": base_hf.get("model_type"), "path": str(model_dir), "fingerprint": fingerprint,
                       "hidden_size": base_hf.get("hidden_size"), "vocab_size": base_hf.get("vocab_size")},
        "tokenizer": tokenizer_info,
        "training_config": dict(training_config) if training_config is not None else None,
    }
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2, default=str))
    return out


class StainedGlassTransform:
    """A trained SGT, loaded from an artifact directory."""

    def __init__(self, cloak, embedding_table: jax.Array, tokenizer, meta: Mapping[str, Any], directory: Path):
        self.cloak = cloak
        self.embedding_table = embedding_table
        self.tokenizer = tokenizer
        self.meta = dict(meta)
        self.directory = directory

    @classmethod
    def load(cls, directory, *, seed: Optional[int] = None) -> "StainedGlassTransform":
        """Load an artifact. ``seed`` (debug only, never secure) makes the noise reproducible."""
        from sgt_jax.cloak import TransformerCloak

        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file():
            raise ArtifactError(f"{directory} is not an SGT artifact (no {CONFIG_NAME}); pass the artifact directory "
                                "written at the end of training (<run_dir>/sgt).")
        meta = json.loads((directory / CONFIG_NAME).read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"{directory} has artifact format {meta.get('format_version')}, this sgt_jax reads "
                                f"{FORMAT_VERSION}; re-export it with a matching version.")
        hp = dict(meta["cloak"])
        kwargs = hp.pop("estimator_kwargs")
        if seed is not None:
            hp["seed"] = seed
        cloak = nnx.eval_shape(lambda: TransformerCloak(config_path=str(directory / "base_config"), **hp, **kwargs))
        graphdef, abstract = nnx.split(cloak)
        weights = load_file(str(directory / WEIGHTS_NAME))
        expected = _flatten(jax.tree.map(lambda x: np.zeros((), np.float32), abstract))
        missing = sorted(set(expected) - set(weights))
        if missing:
            raise ArtifactError(f"{directory / WEIGHTS_NAME} lacks {missing[0]} (and {len(missing) - 1} more); the file "
                                "does not match sgt_config.json.")
        leaves_with_path = jax.tree_util.tree_leaves_with_path(abstract)
        names = list(_flatten(jax.tree.map(lambda x: np.zeros((), np.float32), abstract)))
        treedef = jax.tree_util.tree_structure(abstract)
        values = []
        for name, (_, leaf) in zip(names, leaves_with_path):
            value = weights[name]
            if value.shape != leaf.shape:
                raise ArtifactError(f"{name} in {directory / WEIGHTS_NAME} has shape {value.shape}, expected {leaf.shape}.")
            values.append(jnp.asarray(value))
        cloak = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, values))
        table = jnp.asarray(load_file(str(directory / EMBEDDINGS_NAME))["embed_tokens"])
        tokenizer = None
        if (directory / "tokenizer").is_dir():
            from sgt_jax.data import load_tokenizer

            tokenizer = load_tokenizer(str(directory / "tokenizer"))
        return cls(cloak, table, tokenizer, meta, directory)

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Left-padded ids and masks of ``texts``; every non-pad token is transformed."""
        if self.tokenizer is None:
            raise ArtifactError(f"{self.directory} has no tokenizer/; pass token ids to transform().")
        enc = self.tokenizer(list(texts), padding=True, return_tensors="np")
        return {"input_ids": enc["input_ids"].astype(np.int32), "attention_mask": enc["attention_mask"].astype(np.int32)}

    def transform(self, texts_or_ids, *, attention_mask=None, noise_mask=None, key: Optional[jax.Array] = None) -> dict[str, jax.Array]:
        """Protected embeddings of texts (list of str) or token ids (B, S).

        Returns ``inputs_embeds`` (float32 x_t), ``attention_mask`` and ``input_ids``. Fresh OS entropy per call
        unless ``key`` is given or the artifact was loaded with a seed.
        """
        if isinstance(texts_or_ids, str):
            texts_or_ids = [texts_or_ids]
        if isinstance(texts_or_ids, (list, tuple)) and texts_or_ids and isinstance(texts_or_ids[0], str):
            enc = self.encode(texts_or_ids)
            ids, attention_mask = enc["input_ids"], enc["attention_mask"]
        else:
            ids = np.asarray(texts_or_ids, dtype=np.int32)
            if ids.ndim == 1:
                ids = ids[None]
            if attention_mask is None:
                attention_mask = np.ones_like(ids)
        attention_mask = np.asarray(attention_mask, dtype=np.int32)
        noise_mask = attention_mask if noise_mask is None else np.asarray(noise_mask, dtype=np.int32)
        if key is None:
            # Resolved here, outside jit: fresh entropy drawn while tracing would be baked into the program.
            from sgt_jax.cloak import _fresh_key

            key = jax.random.key(self.cloak.seed) if self.cloak.seed is not None else _fresh_key()
        x_t = _transform_jit(self.cloak, self.embedding_table, jnp.asarray(ids), jnp.asarray(attention_mask),
                             jnp.asarray(noise_mask), key)
        return {"inputs_embeds": x_t, "attention_mask": jnp.asarray(attention_mask), "input_ids": jnp.asarray(ids)}

    def generate(self, texts, *, base_model=None, key: Optional[jax.Array] = None, **gen_kwargs) -> list[str]:
        """Protect ``texts`` (a str or list of str) with the SGT and generate from the protected prompt embeddings
        with the base model; returns the new text of each prompt (special tokens dropped).

        ``base_model``: a :class:`~sgt_jax.models.CausalLM`; when None the model at ``meta["base_model"]["path"]``
        is loaded (bfloat16) once and kept. ``key`` seeds both the transform noise and the sampling (fresh
        entropy when None). ``gen_kwargs`` go to :func:`sgt_jax.generate.generate` (defaults: the recommended
        :class:`~sgt_jax.config.GenerationConfig`; eos/pad/bos ids from the artifact's tokenizer).
        """
        from sgt_jax.config import GenerationConfig
        from sgt_jax.generate import decode_texts, generate
        from sgt_jax.models import CausalLM

        if isinstance(texts, str):
            texts = [texts]
        if self.tokenizer is None:
            raise ArtifactError(f"{self.directory} has no tokenizer/; generate() needs one to encode and decode text.")
        if base_model is None:
            base_model = getattr(self, "_base_model", None)
            if base_model is None:
                base_model = self._base_model = CausalLM.from_pretrained(self.meta["base_model"]["path"])
        transform_key = sample_key = None
        if key is not None:
            transform_key, sample_key = jax.random.split(key)
        # Generation needs left padding whatever the tokenizer's default side.
        enc = self.tokenizer(list(texts), padding=True, return_tensors="np", padding_side="left")
        protected = self.transform(enc["input_ids"], attention_mask=enc["attention_mask"], key=transform_key)
        info = self.meta.get("tokenizer") or {}
        special = {name: gen_kwargs.pop(name, info.get(name, getattr(self.tokenizer, name, None)))
                   for name in ("eos_token_id", "pad_token_id", "bos_token_id")}
        settings = {**dataclasses.asdict(GenerationConfig()), **gen_kwargs}
        out = generate(base_model, inputs_embeds=protected["inputs_embeds"], input_ids=protected["input_ids"],
                       attention_mask=protected["attention_mask"], key=sample_key, **special, **settings)
        return decode_texts(self.tokenizer, out.sequences, out.lengths)


@nnx.jit
def _transform_jit(cloak, table, ids, attention_mask, noise_mask, key):
    """One compiled program per padded shape (eager dispatch of the scanned estimators is slow)."""
    x = jnp.take(table, ids, axis=0).astype(jnp.float32)
    return cloak(x, attention_mask, noise_mask, key=key, deterministic=True).x_t
