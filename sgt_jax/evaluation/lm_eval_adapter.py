"""EleutherAI lm-evaluation-harness adapter: benchmark tasks on the base model with or without an SGT.

``SGTLM`` (registered as ``"sgt_jax"``) runs a base model of this package (``CausalLM``, JAX) for the harness's
three request types. With ``sgt=<artifact dir>`` the prompt goes through the Stained Glass Transform first:

- ``loglikelihood``: the **context** tokens' embeddings are transformed; the **continuation** tokens (the
  answer being scored) stay clean. This is the deployment the SGT protects — a client sends a protected
  prompt, the answer is produced by the model — and it keeps the score a likelihood of the *same* answer
  tokens with and without the SGT. The cloak sees only the context (continuation keys are masked out of its
  estimators), so a bidirectional SGT cannot peek at the answer.
- ``loglikelihood_rolling``: per window, the conditioning part (the prefix token, and for later windows the
  previous tokens) is transformed and the predicted tokens are scored clean.
- ``generate_until``: the whole context is transformed and the model generates from the protected
  embeddings only (no token ids), as a prompt-embedding server would.

Noise: a fixed ``seed`` (default 0), advanced per batch, so runs are reproducible (an SGT in production
draws fresh entropy; for benchmarks reproducibility is what matters). Usage::

    import lm_eval
    from sgt_jax.evaluation.lm_eval_adapter import SGTLM
    lm_eval.simple_evaluate(model=SGTLM("path/to/base_model", sgt="runs/x/sgt"), tasks=["arc_easy"])
    # or: lm_eval --model sgt_jax --model_args pretrained=path/to/base_model,sgt=runs/x/sgt --tasks arc_easy
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgt_jax.data.batching import collate_left_padded
from sgt_jax.data import load_tokenizer
from sgt_jax.inference.artifact import StainedGlassTransform
from sgt_jax.inference.generate import decode_texts, generate
from sgt_jax.models import CausalLM
from sgt_jax.models.hf import resolve_model_path

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as exc:  # pragma: no cover - optional dependency
    raise ImportError("sgt_jax.evaluation.lm_eval_adapter needs lm-eval: pip install lm-eval (or sgt_jax[lm_eval]).") from exc

__all__ = ["SGTLM"]


def _bucket(n: int, multiple: int = 16) -> int:
    return max(multiple, -(-n // multiple) * multiple)  # fewer shapes, fewer compilations


@functools.partial(jax.jit, static_argnames="graphdefs")
def _token_logprobs(graphdefs, states, ids, attention_mask, context_mask, key):
    """Per position t ≥ 1: log p(ids[t] | ids[<t]) and whether ids[t] is the argmax, (B, S-1) each, under the
    (base, cloak or None) that ``graphdefs`` and ``states`` split."""
    base, cloak = (None if g is None else nnx.merge(g, s) for g, s in zip(graphdefs, states))
    x = base.embed(ids)
    if cloak is not None:
        out = cloak(x.astype(jnp.float32), context_mask, context_mask, key=key, deterministic=True)
        x = out.x_t.astype(x.dtype)  # continuation and pad positions are left as they were (clean)
    logits = base(inputs_embeds=x, attention_mask=attention_mask)[:, :-1].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    targets = ids[:, 1:]
    token_lp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return token_lp, jnp.argmax(logits, axis=-1) == targets


@register_model("sgt_jax")
class SGTLM(TemplateLM):
    """lm-eval model: ``pretrained`` base model directory, ``sgt`` an SGT artifact directory (or None)."""

    def __init__(self, pretrained: str, sgt: Optional[str] = None, dtype: str = "float32", batch_size: int = 8,
                 max_length: Optional[int] = None, max_gen_toks: int = 256, seed: int = 0, **kwargs: Any):
        super().__init__()
        model_dir = resolve_model_path(pretrained)
        self.base = CausalLM.from_pretrained(model_dir, dtype=dtype)
        self.tokenizer = load_tokenizer(str(model_dir))
        self.sgt = None
        self.cloak = None
        if sgt not in (None, "", "None", "none"):
            self.sgt = StainedGlassTransform.load(sgt)
            self.sgt.check_base(model_dir)  # an SGT protects prompts only for the base it was trained on
            self.cloak = self.sgt.cloak
        # (graphdefs, states) of the base and the cloak, split once for the jitted scoring function
        self._split = tuple(zip(*(nnx.split(m) if m is not None else (None, None) for m in (self.base, self.cloak))))
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or self.base.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self._key = jax.random.key(int(seed))
        self._calls = itertools.count()

    # ---------------------------------------------------------------------------------------- TemplateLM

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos if bos is not None else self.eot_token_id)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "sgt_jax")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = not (self.tokenizer.bos_token and string.startswith(self.tokenizer.bos_token))
        return list(self.tokenizer(string, add_special_tokens=add_special_tokens)["input_ids"])

    def _next_key(self):
        return jax.random.fold_in(self._key, next(self._calls))

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is greedy) for token-id pairs, batched."""
        results = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            rows = []
            for ctx, cont in chunk:
                whole = (list(ctx) + list(cont))[-self.max_length:]
                n_ctx = max(len(whole) - len(cont), 0)
                rows.append({"input_ids": whole, "context_mask": [1] * n_ctx + [0] * (len(whole) - n_ctx)})
            # A fixed batch shape: one compilation per length bucket.
            batch = collate_left_padded(rows, _bucket(max(len(r["input_ids"]) for r in rows)),
                                        self.tokenizer.pad_token_id, rows=self.batch_size, fields=("context_mask",))
            arrays = (jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "context_mask"))
            lp, greedy = jax.device_get(_token_logprobs(*self._split, *arrays, self._next_key()))
            for i, n_cont in enumerate(len(cont) for _, cont in chunk):
                # targets are ids[:, 1:], so the last n_cont targets sit in the last n_cont columns.
                results.append((float(lp[i, -n_cont:].sum()), bool(greedy[i, -n_cont:].all())))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        results = self._score(pairs)
        for (cache_key, _, _), res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", cache_key, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for (string,) in [r.args for r in requests]:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string, add_special_tokens=False), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            total = sum(lp for lp, _ in self._score(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in requests:
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(gen_kwargs.pop("do_sample", False))
            temperature = float(gen_kwargs.pop("temperature", 0.0) or 0.0)
            if temperature <= 0:
                do_sample, temperature = False, 1.0
            settings = dict(do_sample=do_sample, temperature=temperature,
                            top_p=float(gen_kwargs.pop("top_p", 1.0) or 1.0),
                            top_k=int(gen_kwargs.pop("top_k", 0) or 0))
            ids = self.tok_encode(context)[-(self.max_length - max_new):] if self.max_length > max_new else \
                self.tok_encode(context)
            ids_np = np.asarray([ids], np.int32)
            mask = np.ones_like(ids_np)
            key = self._next_key()
            common = dict(attention_mask=mask, max_new_tokens=max_new, eos_token_id=self.eot_token_id,
                          pad_token_id=self.tokenizer.pad_token_id, key=jax.random.fold_in(key, 1), **settings)
            if self.sgt is not None:
                x_t = self.sgt.transform(ids_np, attention_mask=mask, key=key)["inputs_embeds"]
                res = generate(self.base, inputs_embeds=x_t, **common)
            else:
                res = generate(self.base, input_ids=ids_np, **common)
            text = decode_texts(self.tokenizer, res.sequences, res.lengths)[0]
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", (context, request.args[1]), text)
            out.append(text)
        return out
