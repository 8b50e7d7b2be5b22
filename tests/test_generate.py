"""Generation: greedy equals transformers' PyTorch generate token for token (llama; mistral with a window shorter
than prompt + generation) on left-padded batches; KV-cache decoding equals full recomputation; sampling (top-k 1
is greedy, keys reproduce / differ), eos stopping and padding; logits processors against numpy and HF warpers;
embedding prompts equal id prompts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sgt_jax.inference.generate import (apply_repetition_penalty, apply_temperature, apply_top_k, apply_top_p, generate,
                                       left_pad, process_logits)
from sgt_jax.transform.entropy import fresh_key
from sgt_jax.models import CausalLM
from tiny_checkpoints import make_tiny_checkpoint

FAMILIES = {"llama": ("llama", {}), "mistral_window4": ("mistral", {"sliding_window": 4})}
# Untied, large embeddings: greedy paths that vary token to token, with top-2 logit gaps >> fp32 noise
# (asserted below), so no greedy tie decides a comparison.
TINY = dict(num_hidden_layers=2, tie_word_embeddings=False, init_std=0.1, embedding_std=0.5)
PROMPT_LEN, NEW_TOKENS, EOS, PAD = 7, 8, 2, 0


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {name: make_tiny_checkpoint(tmp_path_factory.mktemp(name), model_type, **TINY, **overrides)
            for name, (model_type, overrides) in FAMILIES.items()}


@pytest.fixture(scope="module")
def models(checkpoints):
    return {name: CausalLM.from_pretrained(path, dtype="float32") for name, path in checkpoints.items()}


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 128, (3, PROMPT_LEN)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, :4] = 0  # three prompt lengths: 3, 5, 7
    mask[1, :2] = 0
    ids[mask == 0] = PAD
    return ids, mask


def greedy(model, ids, mask, **kwargs):
    kwargs = {"eos_token_id": EOS, "pad_token_id": PAD, **kwargs}
    return generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)


@pytest.fixture(scope="module")
def llama_greedy(models, prompts):
    return greedy(models["llama"], *prompts)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_transformers_generate(family, checkpoints, models, prompts):
    import torch
    import transformers

    ids, mask = prompts
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoints[family], attn_implementation="eager", dtype=torch.float32).eval()
    if family.startswith("mistral"):
        assert torch_model.config.sliding_window == 4 < PROMPT_LEN + NEW_TOKENS
    for penalty in (1.0, 1.5):
        ref = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                   max_new_tokens=NEW_TOKENS, eos_token_id=EOS, pad_token_id=PAD,
                                   repetition_penalty=penalty, output_scores=True, return_dict_in_generate=True)
        top2 = [torch.topk(s, 2).values for s in ref.scores]
        assert min(float((t[:, 0] - t[:, 1]).min()) for t in top2) > 1e-3  # no near-tie decides the outcome
        expected = np.full((3, NEW_TOKENS), PAD)
        new = ref.sequences[:, PROMPT_LEN:].numpy()
        expected[:, : new.shape[1]] = new
        out = greedy(models[family], ids, mask, repetition_penalty=penalty)
        np.testing.assert_array_equal(np.asarray(out.sequences), expected)
        assert len({tuple(row) for row in expected.tolist()}) == 3 and len(set(expected[2].tolist())) > 2


def test_kv_cache_decoding_matches_full_recomputation(models, prompts):
    model = models["mistral_window4"]  # sliding window 4 < 15: the window must be applied over cache slots
    ids, mask = prompts
    total = PROMPT_LEN + NEW_TOKENS
    graphdef, state = nnx.split(model)

    @jax.jit
    def cached(state, tokens, cache_mask, cache, index):
        return nnx.merge(graphdef, state)(tokens, attention_mask=cache_mask, cache=cache, cache_index=index)

    cache_mask = np.zeros((3, total), np.int32)
    cache_mask[:, :PROMPT_LEN] = mask
    logits, cache = cached(state, jnp.asarray(ids), jnp.asarray(cache_mask), model.init_cache(3, total), 0)
    sequence, step_logits = [ids], [np.asarray(logits)]
    for step in range(NEW_TOKENS):
        token = np.asarray(jnp.argmax(logits[:, -1], axis=-1))[:, None]
        sequence.append(token)
        cache_mask[:, PROMPT_LEN + step] = 1
        logits, cache = cached(state, jnp.asarray(token), jnp.asarray(cache_mask), cache, PROMPT_LEN + step)
        step_logits.append(np.asarray(logits))
    full = np.asarray(model(jnp.asarray(np.concatenate(sequence, axis=1)), attention_mask=jnp.asarray(cache_mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(step_logits[0][real], full[:, :PROMPT_LEN][real], atol=1e-4, rtol=0)
    for step in range(NEW_TOKENS):
        np.testing.assert_allclose(step_logits[step + 1][:, 0], full[:, PROMPT_LEN + step], atol=1e-4, rtol=0)
    assert np.abs(full[:, PROMPT_LEN:] - full[:, PROMPT_LEN - 1: -1]).max() > 0.1  # steps really differ


def test_sampling_top_k_one_is_greedy_and_keys_reproduce(models, prompts, llama_greedy):
    model, (ids, mask) = models["llama"], prompts
    sample = lambda key, **kw: generate(model, input_ids=ids, attention_mask=mask, key=jax.random.key(key),
                                        max_new_tokens=NEW_TOKENS, eos_token_id=EOS, pad_token_id=PAD, **kw)
    np.testing.assert_array_equal(np.asarray(sample(3, top_k=1).sequences), np.asarray(llama_greedy.sequences))
    hot = dict(temperature=5.0, top_k=0, top_p=1.0)
    first, again, other = sample(1, **hot), sample(1, **hot), sample(2, **hot)
    np.testing.assert_array_equal(np.asarray(first.sequences), np.asarray(again.sequences))
    assert (np.asarray(first.sequences) != np.asarray(other.sequences)).mean() > 0.5
    defaults = sample(4)  # the recommended settings: sampling at temperature 0.6, top-k 5000, top-p 0.9
    assert defaults.sequences.shape == (3, NEW_TOKENS) and np.all(np.asarray(defaults.lengths) >= 1)


def expected_after_eos(sequences, eos):
    out = np.full_like(sequences, PAD)
    lengths = []
    for row, tokens in enumerate(sequences):
        hits = np.flatnonzero(tokens == eos)
        n = hits[0] + 1 if hits.size else len(tokens)
        out[row, :n] = tokens[:n]
        lengths.append(n)
    return out, np.asarray(lengths)


def test_rows_stop_at_their_first_eos_and_are_padded(models, prompts, llama_greedy):
    model, (ids, mask) = models["llama"], prompts
    free = np.asarray(llama_greedy.sequences)
    eos = int(free[0, 2])  # the token row 0 greedily emits at step 2 becomes the eos
    expected, lengths = expected_after_eos(free, eos)
    assert lengths[0] <= 3 and lengths.max() == NEW_TOKENS  # row 0 stops early, another runs to the end
    for out in (greedy(model, ids, mask, eos_token_id=eos),
                generate(model, input_ids=ids, attention_mask=mask, key=jax.random.key(0), top_k=1,
                         max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=PAD)):
        np.testing.assert_array_equal(np.asarray(out.sequences), expected)
        np.testing.assert_array_equal(np.asarray(out.lengths), lengths)


def test_generation_from_embeddings_equals_generation_from_ids(models, prompts):
    model, (ids, mask) = models["llama"], prompts
    embeds = np.asarray(model.embedding_table)[ids]  # the identity SGT: x_t = the token embeddings
    from_ids = greedy(model, ids, mask, repetition_penalty=1.5)
    # The prompt ids ride along for the repetition penalty, as the artifact passes them.
    from_embeds = generate(model, inputs_embeds=embeds, input_ids=ids, attention_mask=mask, do_sample=False,
                           max_new_tokens=NEW_TOKENS, eos_token_id=EOS, pad_token_id=PAD, repetition_penalty=1.5)
    np.testing.assert_array_equal(np.asarray(from_embeds.sequences), np.asarray(from_ids.sequences))


# ------------------------------------------------------------------------------------------ logits processors

LOGITS = np.array([[2.0, -1.0, 0.5, 3.0, -2.5, 1.5, 0.0, -0.3],
                   [9.0, 1.0, -1.0, 0.2, 0.1, -3.0, 2.0, 0.7]], np.float32)  # row 1: one token holds > 0.9
SEEN = np.zeros_like(LOGITS, bool)
SEEN[0, [1, 3, 6]] = True
SEEN[1, [0, 5]] = True


def numpy_top_p(x, p):
    out = x.copy()
    for row in range(len(x)):
        order = np.argsort(-x[row])
        probs = np.exp(x[row][order] - x[row].max())
        probs /= probs.sum()
        mass_above = np.concatenate([[0.0], np.cumsum(probs)[:-1]])
        out[row, order[mass_above >= p]] = -np.inf  # keep a token while the more likely ones hold < p
    return out


def numpy_top_k(x, k):
    kth = np.sort(x, axis=-1)[:, ::-1][:, k - 1: k]
    return np.where(x < kth, -np.inf, x)


def numpy_penalty(x, seen, penalty):
    out = x.copy()
    for row, col in zip(*np.nonzero(seen)):
        out[row, col] = x[row, col] / penalty if x[row, col] > 0 else x[row, col] * penalty
    return out


def hf_processors(penalty=None, temperature=None, top_k=None, top_p=None, renormalize=False):
    import torch
    from transformers.generation import logits_process as lp

    procs = []
    if penalty is not None:
        procs.append(lp.RepetitionPenaltyLogitsProcessor(penalty))
    if temperature is not None:
        procs.append(lp.TemperatureLogitsWarper(temperature))
    if top_k is not None:
        procs.append(lp.TopKLogitsWarper(top_k))
    if top_p is not None:
        procs.append(lp.TopPLogitsWarper(top_p))
    if renormalize:
        procs.append(lp.LogitNormalization())
    seen_ids = torch.tensor([[1, 3, 6, 6], [0, 5, 5, 0]])  # the SEEN tokens, repeats included
    return lp.LogitsProcessorList(procs)(seen_ids, torch.tensor(LOGITS)).numpy()


def test_logits_processors_match_numpy_and_transformers():
    x = jnp.asarray(LOGITS)
    cases = [
        (apply_temperature(x, 0.7), LOGITS / np.float32(0.7), dict(temperature=0.7)),
        (apply_top_k(x, 3), numpy_top_k(LOGITS, 3), dict(top_k=3)),
        (apply_top_p(x, 0.8), numpy_top_p(LOGITS, 0.8), dict(top_p=0.8)),
        (apply_repetition_penalty(x, jnp.asarray(SEEN), 1.3), numpy_penalty(LOGITS, SEEN, 1.3), dict(penalty=1.3)),
    ]
    for ours, reference, hf_kwargs in cases:
        np.testing.assert_allclose(np.asarray(ours), reference, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(ours), hf_processors(**hf_kwargs), rtol=1e-6)
    # The chain in HF's order, then renormalised.
    chain = process_logits(x, jnp.asarray(SEEN), do_sample=True, temperature=0.6, top_k=5, top_p=0.7,
                           repetition_penalty=1.3, renormalize_logits=True)
    hf = hf_processors(penalty=1.3, temperature=0.6, top_k=5, top_p=0.7, renormalize=True)
    np.testing.assert_allclose(np.asarray(chain), hf, rtol=1e-5, atol=1e-6)
    kept = numpy_top_p(numpy_top_k(numpy_penalty(LOGITS, SEEN, 1.3) / np.float32(0.6), 5), 0.7)
    np.testing.assert_array_equal(np.isfinite(np.asarray(chain)), np.isfinite(kept))
    np.testing.assert_allclose(np.exp(np.asarray(chain)).sum(-1), 1.0, rtol=1e-5)
    # The references are not vacuous: each filter removes something, top-p keeps one token in row 1.
    assert np.isinf(numpy_top_p(LOGITS, 0.8)[0]).sum() >= 3 and np.isfinite(numpy_top_p(LOGITS, 0.8)[1]).sum() == 1
    # Disabled settings are identities (HF adds no warper for them).
    np.testing.assert_array_equal(np.asarray(apply_top_k(x, 0)), LOGITS)
    np.testing.assert_array_equal(np.asarray(apply_top_p(x, 1.0)), LOGITS)
    greedy_scores = process_logits(x, jnp.asarray(SEEN), do_sample=False, temperature=0.6, top_k=1, top_p=0.1,
                                   repetition_penalty=1.0, renormalize_logits=False)
    np.testing.assert_array_equal(np.asarray(greedy_scores), LOGITS)  # greedy: no warpers


@pytest.mark.slow
def test_artifact_generate_uses_the_protected_prompt(tmp_path):
    from sgt_jax.inference.artifact import StainedGlassTransform, save_artifact
    from sgt_jax.transform.cloak import TransformerCloak
    from sgt_jax.config import CloakConfig
    from sgt_jax.data import load_tokenizer
    from sgt_jax.inference.generate import decode_texts
    from tiny_checkpoints import make_tiny_model_dir

    model_dir = make_tiny_model_dir(tmp_path / "model", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, corpus_examples=100)
    cfg = CloakConfig(scale=[1e-3, 1.0])
    cloak = TransformerCloak.from_config(cfg, str(model_dir), rngs=nnx.Rngs(0))
    from sgt_jax.models.fingerprint import model_fingerprint

    directory = save_artifact(tmp_path / "sgt", params=nnx.state(cloak, nnx.Param), cloak_config=cfg,
                              model_dir=model_dir, fingerprint=model_fingerprint(model_dir),
                              tokenizer=load_tokenizer(str(model_dir)))
    sgt = StainedGlassTransform.load(directory)
    texts, key = ["What is the capital of France?", "Add 2 and 3."], jax.random.key(5)
    texts_out = sgt.generate(texts, key=key, do_sample=False, max_new_tokens=4)  # base model from the artifact
    assert isinstance(texts_out, list) and len(texts_out) == 2 and all(isinstance(t, str) for t in texts_out)
    # The same as protecting by hand (the first half of the key) and generating from x_t with the prompt ids.
    protected = sgt.transform(texts, key=jax.random.split(key)[0])
    tok = sgt.tokenizer
    manual = generate(sgt.base_model(), inputs_embeds=protected["inputs_embeds"], input_ids=protected["input_ids"],
                      attention_mask=protected["attention_mask"], do_sample=False, max_new_tokens=4,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert texts_out == decode_texts(tok, manual.sequences, manual.lengths)
    assert np.asarray(manual.lengths).min() >= 1


def test_left_pad_prompts_and_plain_id_lists():
    """Prompts with a noise mask keep it; plain id lists are noised whole; padding on the left."""
    ids, mask, noise = left_pad([{"input_ids": [4, 5], "noise_mask": [0, 1]}, [7, 8, 9]], 0)
    assert ids.tolist() == [[0, 4, 5], [7, 8, 9]]
    assert mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert noise.tolist() == [[0, 0, 1], [1, 1, 1]]


def test_fresh_keys_fill_the_whole_key_and_a_seed_reproduces():
    """Every word of an unseeded key comes from OS entropy (a key from a 32-bit int leaves the first word 0),
    no two draws repeat, and a debug seed gives ``jax.random.key(seed)``."""
    words = np.stack([np.asarray(jax.random.key_data(fresh_key())) for _ in range(16)])
    assert len({tuple(w) for w in words}) == 16
    assert all(len(set(words[:, i])) > 1 for i in range(words.shape[1]))
    assert np.array_equal(jax.random.key_data(fresh_key(3)), jax.random.key_data(jax.random.key(3)))
