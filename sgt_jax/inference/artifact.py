"""The SGT artifact: what a client needs to protect prompts, as safetensors + JSON (no pickle anywhere).

Layout of an artifact directory::

    sgt_config.json        format version, cloak hyperparameters, base model family/fingerprint, tokenizer info
    cloak.safetensors      the cloak's float32 parameters, named by their module path (e.g. std_head.kernel)
    embeddings.safetensors the base model's input embedding table (the client embeds with it)
    base_config/config.json the base model's Hugging Face config (the estimators are built from it)
    tokenizer/             the base model's tokenizer files

``StainedGlassTransform.load(dir)`` rebuilds the cloak and ``.transform(texts or ids)`` returns protected
embeddings, with fresh OS entropy for the noise on every call unless a key is given. Texts are rendered and
masked by the rule training used (``noise_rule`` in sgt_config.json: the data format, its template version
and ``transform_all_tokens``), so BOS, template and special tokens stay clean exactly as in training. No
debug seed is ever saved: noise in anything shipped is fresh per call.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file
from sgt_jax.errors import SGTError
from sgt_jax.transform.entropy import fresh_key
from sgt_jax.config import GenerationConfig, load_config
from sgt_jax.data import load_tokenizer
from sgt_jax.data.formats import TEMPLATE_VERSION, encode_prompts
from sgt_jax.inference.generate import decode_texts, generate, left_pad
from sgt_jax.models import CausalLM
from sgt_jax.models.fingerprint import model_fingerprint
from sgt_jax.models.hf import SafetensorsReader
from sgt_jax.transform.cloak import TransformerCloak

FORMAT_VERSION = 1
CONFIG_NAME = "sgt_config.json"
WEIGHTS_NAME = "cloak.safetensors"
EMBEDDINGS_NAME = "embeddings.safetensors"


log = logging.getLogger(__name__)


class ArtifactError(SGTError):
    """A missing or malformed artifact; one line naming the path and the fix."""


class DebugSeedError(ArtifactError):
    """An artifact that holds a debug ``cloak.seed`` (identical noise on every prompt) was loaded."""


class BaseModelMismatchError(ArtifactError):
    """An artifact used with another base model than the one it was trained on."""


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
        "rho_init": cloak.rho_init,
        "std_dropout": cloak.std_dropout,
        "mean_dropout": cloak.mean_dropout,
        "directly_learn_stds": cloak.directly_learn_stds,
        "mean_num_experts": cloak.mean_num_experts,
        "std_num_experts": cloak.std_num_experts,
        "use_causal_mask": cloak.use_causal_mask,
        "estimator_kwargs": dict(cloak.estimator_kwargs),
        "mean_bound": cloak.mean_bound,
    }


def noise_rule(data_config=None, tokenizer=None) -> dict[str, Any]:
    """How training chose the noised tokens: the data format (its template version, and for chat the hash of
    the tokenizer's chat template) and ``transform_all_tokens``. ``data_config``: a DataConfig or its dict;
    None: plain text (every content token noised, special tokens such as BOS clean)."""
    get = (lambda k, d: data_config.get(k, d)) if isinstance(data_config, Mapping) else (  # noqa: E731
        lambda k, d: getattr(data_config, k, d))
    fmt = get("format", "text") if data_config is not None else "text"
    rule = {"format": fmt, "transform_all_tokens": bool(get("transform_all_tokens", False)),
            "template_version": TEMPLATE_VERSION, "text_column": get("text_column", "text"),
            "messages_column": get("messages_column", "messages")}
    if fmt == "chat":
        rule["chat_template_sha256"] = _chat_template_hash(tokenizer)
    return rule


def _chat_template_hash(tokenizer) -> Optional[str]:
    template = getattr(tokenizer, "chat_template", None)
    return hashlib.sha256(str(template).encode()).hexdigest() if template else None


def _without_seed(training_config: Optional[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
    if training_config is None:
        return None
    out = dict(training_config)
    if isinstance(out.get("cloak"), Mapping):
        out["cloak"] = {k: v for k, v in out["cloak"].items() if k != "seed"}
    return out


def save_artifact(
    out_dir, *, params, cloak_config, model_dir, fingerprint: str, tokenizer=None,
    training_config: Optional[Mapping[str, Any]] = None, embedding_table: Optional[np.ndarray] = None,
    data_config=None,
) -> Path:
    """Write the artifact for cloak ``params`` (an nnx State) built per ``cloak_config`` on ``model_dir``.

    ``data_config`` (or else ``training_config["data"]``) gives the noise rule inference reproduces. A
    ``cloak.seed`` is a debug setting: it is dropped with a warning, never saved."""
    out = Path(out_dir)
    model_dir = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "base_config").mkdir(exist_ok=True)
    shutil.copy(model_dir / "config.json", out / "base_config" / "config.json")
    if getattr(cloak_config, "seed", None) is not None:
        log.warning("cloak.seed=%s is a debug setting (identical noise on every prompt): it is not saved in the "
                    "artifact, which draws fresh noise per call", cloak_config.seed)
        cloak_config = dataclasses.replace(cloak_config, seed=None)
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
        "noise_rule": noise_rule(data_config if data_config is not None else (training_config or {}).get("data"),
                                 tokenizer),
        "training_config": _without_seed(training_config),
    }
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2, default=str))
    return out


def _read_meta(directory: Path, seed: Optional[int], allow_debug_seed: bool) -> dict[str, Any]:
    if not (directory / CONFIG_NAME).is_file():
        raise ArtifactError(f"{directory} is not an SGT artifact (no {CONFIG_NAME}); pass the artifact directory "
                            "written at the end of training (<run_dir>/sgt).")
    meta = json.loads((directory / CONFIG_NAME).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{directory} has artifact format {meta.get('format_version')}, this sgt_jax reads "
                            f"{FORMAT_VERSION}; re-export it with a matching version.")
    stored = meta["cloak"].get("seed")
    if stored is not None and seed is None and not allow_debug_seed:
        raise DebugSeedError(f"{directory} holds the debug cloak.seed={stored} (every prompt would get the same "
                             "noise); re-save it without a seed, or load with allow_debug_seed=True to debug.")
    rule = meta.get("noise_rule") or {}
    if rule and rule.get("template_version") != TEMPLATE_VERSION:
        raise ArtifactError(f"{directory} was trained with prompt template version {rule.get('template_version')}, "
                            f"this sgt_jax renders version {TEMPLATE_VERSION}; use the sgt_jax that trained it.")
    return meta


def _load_cloak(directory: Path, hp: dict[str, Any]):
    kwargs = hp.pop("estimator_kwargs")
    cloak = nnx.eval_shape(lambda: TransformerCloak(config_path=str(directory / "base_config"), **hp, **kwargs))
    graphdef, abstract = nnx.split(cloak)
    weights = load_file(str(directory / WEIGHTS_NAME))
    names = list(_flatten(jax.tree.map(lambda x: np.zeros((), np.float32), abstract)))
    missing = sorted(set(names) - set(weights))
    if missing:
        raise ArtifactError(f"{directory / WEIGHTS_NAME} lacks {missing[0]} (and {len(missing) - 1} more); the file "
                            "does not match sgt_config.json.")
    values = []
    for name, (_, leaf) in zip(names, jax.tree_util.tree_leaves_with_path(abstract)):
        value = weights[name]
        if value.shape != leaf.shape:
            raise ArtifactError(f"{name} in {directory / WEIGHTS_NAME} has shape {value.shape}, expected {leaf.shape}.")
        values.append(jnp.asarray(value))
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract), values))


def resolve_sgt_path(path) -> tuple[Path, Optional[Path]]:
    """(artifact_dir, run_dir or None) for a training run directory (with ``sgt/``) or an artifact directory."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        run_dir = path.parent if path.name == "sgt" and (path.parent / "tensorboard").exists() else None
        return path, run_dir
    if (path / "sgt" / CONFIG_NAME).is_file():
        return path / "sgt", path
    what = "does not exist" if not path.exists() else f"has no {CONFIG_NAME} (nor sgt/{CONFIG_NAME})"
    raise ArtifactError(f"--sgt {str(path)!r} {what}; pass a training run directory or its sgt/ artifact directory.")


class StainedGlassTransform:
    """A trained SGT, loaded from an artifact directory."""

    def __init__(self, cloak, embedding_table: jax.Array, tokenizer, meta: Mapping[str, Any], directory: Path):
        self.cloak = cloak
        self.embedding_table = embedding_table
        self.tokenizer = tokenizer
        self.meta = dict(meta)
        self.directory = directory
        self.noise_rule = dict(self.meta.get("noise_rule") or noise_rule())

    @classmethod
    def load(cls, directory, *, seed: Optional[int] = None, allow_debug_seed: bool = False) -> "StainedGlassTransform":
        """Load an artifact. ``seed`` (debug only, never secure) makes the noise of every call identical; an
        artifact that holds a seed (written by an older sgt_jax) loads only with ``allow_debug_seed=True``."""
        directory = Path(directory)
        meta = _read_meta(directory, seed, allow_debug_seed)
        hp = dict(meta["cloak"])
        hp["seed"] = seed if seed is not None else hp.get("seed")
        cloak = _load_cloak(directory, hp)
        table = jnp.asarray(load_file(str(directory / EMBEDDINGS_NAME))["embed_tokens"])
        tokenizer = None
        if (directory / "tokenizer").is_dir():
            tokenizer = load_tokenizer(str(directory / "tokenizer"))
        return cls(cloak, table, tokenizer, meta, directory)

    def check_base(self, model_dir) -> None:
        """Raise :class:`BaseModelMismatchError` unless ``model_dir`` holds, by content, the base model this
        SGT was trained on (an SGT only protects prompts for the model whose embeddings it learned)."""
        expected = (self.meta.get("base_model") or {}).get("fingerprint")
        actual = model_fingerprint(model_dir)
        if expected != actual:
            raise BaseModelMismatchError(
                f"the base model at {model_dir} (fingerprint {actual}) is not the one {self.directory} was trained "
                f"on ({expected}); use that model (model.path) or train an SGT for this one.")

    def run_config(self, overrides: Sequence[str] = ()):
        """The :class:`~sgt_jax.config.SGTConfig` the SGT was trained with, under ``key=value`` overrides (an
        artifact saved without its training configuration contributes its base model path alone)."""
        saved = dict(self.meta.get("training_config") or {})
        saved.pop("base_model_fingerprint", None)  # the trainer's record of the base, not a setting
        return load_config(overrides=overrides, saved=saved or {"model": {"path": self.meta["base_model"]["path"]}})

    def encode(self, prompts: Sequence) -> dict[str, np.ndarray]:
        """Left-padded ``input_ids``, ``attention_mask`` and ``noise_mask`` of ``prompts`` (str, or example dicts /
        chat messages of the training format), rendered and masked by the code path training data goes through
        (:func:`sgt_jax.data.formats.encode_prompts` with the artifact's ``noise_rule``)."""
        if self.tokenizer is None:
            raise ArtifactError(f"{self.directory} has no tokenizer/; pass token ids to transform().")
        rule = self.noise_rule
        if rule.get("chat_template_sha256") not in (None, _chat_template_hash(self.tokenizer)):
            raise ArtifactError(f"the chat template of {self.directory / 'tokenizer'} differs from the one the SGT "
                                "was trained with; restore the artifact's tokenizer files.")
        encoded = encode_prompts(list(prompts), self.tokenizer, rule["format"],
                                 transform_all_tokens=bool(rule.get("transform_all_tokens")),
                                 text_column=rule.get("text_column", "text"),
                                 messages_column=rule.get("messages_column", "messages"))
        ids, mask, noise = left_pad(encoded, self.tokenizer.pad_token_id)
        return {"input_ids": ids, "attention_mask": mask, "noise_mask": noise}

    def _ids_noise_mask(self, ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Token ids without a mask: every real token but the special ones (BOS, EOS, ...) is noised, unless
        training transformed all tokens; template tokens can only be told apart from text (use encode())."""
        noise = attention_mask.astype(bool)
        if not self.noise_rule.get("transform_all_tokens") and self.tokenizer is not None:
            noise &= ~np.isin(ids, np.asarray(self.tokenizer.all_special_ids, dtype=np.int64))
        return noise.astype(np.int32)

    def transform(self, prompts_or_ids, *, attention_mask=None, noise_mask=None,
                  key: Optional[jax.Array] = None) -> dict[str, jax.Array]:
        """Protected embeddings of prompts (str / list of str or example dicts, see :meth:`encode`) or of
        token ids (B, S) (left-padded, with their ``attention_mask``).

        ``noise_mask`` (B, S): the tokens to transform; by default the mask training would use. Returns
        ``inputs_embeds`` (float32 x_t), ``attention_mask``, ``input_ids`` and ``noise_mask``. Fresh OS entropy
        per call unless ``key`` is given (or a debug seed was passed to :meth:`load`).
        """
        if isinstance(prompts_or_ids, (str, dict)):
            prompts_or_ids = [prompts_or_ids]
        if _are_prompts(prompts_or_ids):
            enc = self.encode(prompts_or_ids)
            ids, attention_mask = enc["input_ids"], enc["attention_mask"]
            default_noise = enc["noise_mask"]
        else:
            ids = np.asarray(prompts_or_ids, dtype=np.int32)
            ids = ids[None] if ids.ndim == 1 else ids
            attention_mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
            default_noise = self._ids_noise_mask(ids, np.asarray(attention_mask))
        attention_mask = np.asarray(attention_mask, dtype=np.int32)
        noise_mask = default_noise if noise_mask is None else np.asarray(noise_mask, dtype=np.int32)
        if key is None:
            key = fresh_key(self.cloak.seed)  # outside jit, so that the entropy is not baked into the program
        x_t, _ = transform_embeddings(self.cloak, self.embedding_table, jnp.asarray(ids),
                                      jnp.asarray(attention_mask), jnp.asarray(noise_mask), key)
        return {"inputs_embeds": x_t, "attention_mask": jnp.asarray(attention_mask), "input_ids": jnp.asarray(ids),
                "noise_mask": jnp.asarray(noise_mask)}

    def base_model(self):
        """The base model at ``meta["base_model"]["path"]`` (checked by content against the trained one),
        loaded once and kept."""
        if getattr(self, "_base_model", None) is None:
            path = self.meta["base_model"]["path"]
            self.check_base(path)
            self._base_model = CausalLM.from_pretrained(path)
        return self._base_model

    def generate(self, prompts, *, base_model=None, key: Optional[jax.Array] = None, noise_mask=None,
                 **gen_kwargs) -> list[str]:
        """Protect ``prompts`` (as :meth:`transform`) with the SGT and generate from the protected prompt
        embeddings with the base model; returns the new text of each prompt (special tokens dropped).

        ``base_model``: a :class:`~sgt_jax.models.CausalLM`; when None the artifact's base model (see
        :meth:`base_model`). ``key`` seeds both the transform noise and the sampling (fresh entropy when None).
        ``gen_kwargs`` go to :func:`sgt_jax.inference.generate.generate` (defaults: the recommended
        :class:`~sgt_jax.config.GenerationConfig`; eos/pad/bos ids from the artifact's tokenizer).
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if self.tokenizer is None:
            raise ArtifactError(f"{self.directory} has no tokenizer/; generate() needs one to encode and decode text.")
        base_model = self.base_model() if base_model is None else base_model
        transform_key = sample_key = None
        if key is not None:
            transform_key, sample_key = jax.random.split(key)
        protected = self.transform(prompts, noise_mask=noise_mask, key=transform_key)  # always left-padded
        info = self.meta.get("tokenizer") or {}
        special = {name: gen_kwargs.pop(name, info.get(name, getattr(self.tokenizer, name, None)))
                   for name in ("eos_token_id", "pad_token_id", "bos_token_id")}
        settings = {**dataclasses.asdict(GenerationConfig()), **gen_kwargs}
        out = generate(base_model, inputs_embeds=protected["inputs_embeds"], input_ids=protected["input_ids"],
                       attention_mask=protected["attention_mask"], key=sample_key, **special, **settings)
        return decode_texts(self.tokenizer, out.sequences, out.lengths)


def _are_prompts(items) -> bool:
    """A batch of prompts (str, example dicts, chat message lists), as opposed to token ids."""
    first = items[0] if isinstance(items, (list, tuple)) and items else None
    return isinstance(first, (str, dict)) or (isinstance(first, (list, tuple)) and bool(first)
                                              and isinstance(first[0], dict))


def transform_embeddings(cloak, table, ids, attention_mask, noise_mask, key) -> tuple[jax.Array, jax.Array]:
    """(x_t, sigma) of token ids (B, S) under ``cloak`` with dropout off, embedded with ``table`` (V, D); one
    compiled program per padded shape (eager dispatch of the scanned estimators is slow)."""
    graphdef, state = nnx.split(cloak)
    return _transform_embeddings(graphdef, state, table, ids, attention_mask, noise_mask, key)


@functools.partial(jax.jit, static_argnames="graphdef")
def _transform_embeddings(graphdef, state, table, ids, attention_mask, noise_mask, key):
    x = jnp.take(table, ids, axis=0).astype(jnp.float32)
    out = nnx.merge(graphdef, state)(x, attention_mask, noise_mask, key=key, deterministic=True)
    return out.x_t, out.sigma
