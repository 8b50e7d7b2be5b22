"""The base model's identity comes from its content: one changed weight value (same shapes, names and file
size) is another model, for resume checks, cached generations and the artifact."""

import shutil

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from sgt_jax.inference.artifact import ArtifactError, BaseModelMismatchError, StainedGlassTransform, save_artifact
from sgt_jax.transform.cloak import TransformerCloak
from sgt_jax.config import CloakConfig
from sgt_jax.data import load_tokenizer
from sgt_jax.models import fingerprint as fp
from tiny_checkpoints import make_tiny_model_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fingerprint")
    base = make_tiny_model_dir(root / "base", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, corpus_examples=50)
    tuned = root / "tuned"
    shutil.copytree(base, tuned, ignore=shutil.ignore_patterns(fp.CACHE_NAME))
    weights_file = tuned / "model.safetensors"
    weights = load_file(str(weights_file))
    name = sorted(weights)[0]
    weights[name] = weights[name].copy()
    weights[name].flat[0] += 1.0  # one value of one tensor
    size = weights_file.stat().st_size
    save_file(weights, str(weights_file), metadata={"format": "pt"})
    assert weights_file.stat().st_size == size  # same header, same shapes: only the bytes differ
    return base, tuned


def test_one_changed_weight_changes_the_fingerprint(models):
    base, tuned = models
    a, b = fp.model_fingerprint(base), fp.model_fingerprint(tuned)
    assert a != b and len(a) == 16
    assert fp.model_fingerprint(shutil.copytree(base, base.parent / "copy")) == a  # content, not the path


def test_digests_are_cached_by_size_and_mtime(models, tmp_path, monkeypatch):
    base, _ = models
    model = shutil.copytree(base, tmp_path / "model")
    first = fp.model_fingerprint(model)
    assert (model / fp.CACHE_NAME).is_file()  # beside the model

    def no_hashing(path):
        raise AssertionError(f"{path} was hashed again")

    monkeypatch.setattr(fp, "file_digest", no_hashing)
    assert fp.model_fingerprint(model) == first  # hashed once
    monkeypatch.undo()
    # A model directory that cannot hold the cache: the user cache directory does.
    (model / fp.CACHE_NAME).unlink()
    (model / fp.CACHE_NAME).mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert fp.model_fingerprint(model) == first
    assert list((tmp_path / "cache" / "sgt_jax" / "fingerprints").glob("*.json"))


def test_an_artifact_refuses_another_base_in_one_line(models, tmp_path, capsys):
    from sgt_jax.evaluation.evaluate import main as evaluate_main

    base, tuned = models
    cfg = CloakConfig(scale=[1e-3, 1.0])
    cloak = TransformerCloak.from_config(cfg, str(base), rngs=nnx.Rngs(0))
    directory = save_artifact(tmp_path / "sgt", params=nnx.state(cloak, nnx.Param), cloak_config=cfg,
                              model_dir=base, fingerprint=fp.model_fingerprint(base),
                              tokenizer=load_tokenizer(str(base)))
    sgt = StainedGlassTransform.load(directory)
    sgt.check_base(base)  # the trained base passes
    with pytest.raises(BaseModelMismatchError, match="is not the one") as info:
        sgt.check_base(tuned)
    assert "\n" not in str(info.value) and isinstance(info.value, ArtifactError)
    # The evaluation entry point: exit code 2 and one line, before any model is loaded.
    assert evaluate_main(["--sgt", str(directory), f"model.path={tuned}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not the one" in err[0]
    # generate() with the artifact's own base path checks it too.
    sgt.meta["base_model"]["path"] = str(tuned)
    with pytest.raises(BaseModelMismatchError):
        sgt.generate(["hello"], max_new_tokens=1)
    np.testing.assert_equal(sgt.meta["base_model"]["fingerprint"], fp.model_fingerprint(base))
