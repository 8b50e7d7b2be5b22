"""Checkpoint I/O: truncated loads read nothing above layer k, sharded indexes, round trip, one-line errors."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sgt_jax.models import CausalLM
from sgt_jax.models.hf import ModelLoadError, load_causal_lm, save_pretrained_safetensors
from tiny_checkpoints import make_tiny_checkpoint

TRUNCATE_AT = 1


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(1)
    mask = np.ones((2, 10), np.int64)
    mask[0, :3] = 0
    return jnp.asarray(rng.integers(3, 128, (2, 10))), jnp.asarray(mask)


def test_truncated_load_reads_nothing_above_k(llama_dir, batch, tmp_path):
    ids, mask = batch
    full_hidden = CausalLM.from_pretrained(llama_dir, dtype="float32")(ids, attention_mask=mask,
                                                                        return_hidden_at=TRUNCATE_AT)
    # A checkpoint whose upper layers, final norm and LM head are gone: any read of them would fail.
    stripped = tmp_path / "stripped"
    stripped.mkdir()
    (stripped / "config.json").write_text((llama_dir / "config.json").read_text())
    tensors = load_file(str(llama_dir / "model.safetensors"))
    kept = {name: t for name, t in tensors.items()
            if not (name.startswith("lm_head") or name == "model.norm.weight"
                    or any(name.startswith(f"model.layers.{i}.") for i in range(TRUNCATE_AT + 1, 4)))}
    assert len(kept) < len(tensors)
    save_file(kept, str(stripped / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="is missing from the checkpoint"):
        CausalLM.from_pretrained(stripped, dtype="float32")  # the full model does need them

    names_read = []
    model = load_causal_lm(CausalLM, stripped, dtype="float32", truncate_at_layer=TRUNCATE_AT,
                           reader_hook=lambda reader: setattr(reader, "names_read", names_read))
    assert not any(name.startswith(("lm_head", "model.norm", f"model.layers.{TRUNCATE_AT + 1}.")) for name in names_read)
    assert model.lm_head is None and model.decoder.final_norm is None
    truncated_hidden = model(ids, attention_mask=mask)
    assert truncated_hidden.shape == (2, 10, 64)
    np.testing.assert_allclose(np.asarray(truncated_hidden), np.asarray(full_hidden), atol=1e-6)


def test_sharded_index_checkpoint_loads_identically(llama_dir, batch, tmp_path):
    sharded = make_tiny_checkpoint(tmp_path / "sharded", "llama", max_shard_size="50KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(set(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    ids, mask = batch
    a = CausalLM.from_pretrained(sharded, dtype="float32")(ids, attention_mask=mask)
    b = CausalLM.from_pretrained(llama_dir, dtype="float32")(ids, attention_mask=mask)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bf16_checkpoint_loads_without_torch_path(tmp_path, batch):
    path = make_tiny_checkpoint(tmp_path / "bf16", "qwen2", dtype="bfloat16")
    model = CausalLM.from_pretrained(path, dtype="bfloat16")
    assert model.embedding_table.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(model(batch[0], attention_mask=batch[1]))).all()


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_round_trip_through_transformers(model_type, llama_dir, batch, tmp_path):
    import torch
    import transformers

    source = llama_dir if model_type == "llama" else make_tiny_checkpoint(tmp_path / "src", model_type,
                                                                          tie_word_embeddings=True)
    ours = CausalLM.from_pretrained(source, dtype="float32")
    out_dir = save_pretrained_safetensors(ours, ours.config, tmp_path / "saved")
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(out_dir, attn_implementation="eager").eval()
    ids, mask = (np.asarray(x) for x in batch)
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                          position_ids=torch.tensor(np.maximum(mask.cumsum(-1) - 1, 0))).logits.numpy()
    logits = np.asarray(ours(batch[0], attention_mask=batch[1]))
    assert np.abs(logits - ref)[mask.astype(bool)].max() < 1e-4
    reloaded = CausalLM.from_pretrained(out_dir, dtype="float32")(batch[0], attention_mask=batch[1])
    np.testing.assert_array_equal(np.asarray(reloaded), logits)


def _one_line_error(path, match, **kwargs):
    with pytest.raises(ModelLoadError, match=match) as err:
        CausalLM.from_pretrained(path, dtype="float32", **kwargs)
    assert "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)
    return str(err.value)


def test_user_errors_are_one_line(llama_dir, tmp_path):
    assert "nowhere" in _one_line_error(tmp_path / "nowhere", "not a directory")
    _one_line_error("embedded:no-such-model", "not a directory")

    (tmp_path / "empty").mkdir()
    _one_line_error(tmp_path / "empty", "no config.json")

    wrong_family = tmp_path / "gpt2"
    wrong_family.mkdir()
    config = json.loads((llama_dir / "config.json").read_text())
    (wrong_family / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    (wrong_family / "model.safetensors").write_bytes((llama_dir / "model.safetensors").read_bytes())
    _one_line_error(wrong_family, "model_type='gpt2' is not supported")

    pickle_only = tmp_path / "pickle"
    pickle_only.mkdir()
    (pickle_only / "config.json").write_text(json.dumps(config))
    (pickle_only / "pytorch_model.bin").write_bytes(b"not really a pickle")
    _one_line_error(pickle_only, "safetensors only")

    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps(config))
    _one_line_error(tmp_path / "noweights", "has no weights")

    _one_line_error(llama_dir, "truncate_at_layer=4 is out of range", truncate_at_layer=4)

    mismatched = tmp_path / "mismatch"
    mismatched.mkdir()
    (mismatched / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    (mismatched / "model.safetensors").write_bytes((llama_dir / "model.safetensors").read_bytes())
    _one_line_error(mismatched, r"tensor 'model.layers.0.mlp.\w+_proj.weight' has shape")
