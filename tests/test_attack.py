"""Privacy against learned attackers: inverters, the attack trainer and its leakage bound, the CLI and the frontier."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sgt_jax.evaluation.inversion import PromptSet, assert_disjoint, gaussian_transform, noised_batches, run_attacks

V, D, L = 16, 16, 8


def _table(scale=0.1):
    return jax.random.normal(jax.random.key(0), (V, D)) * scale


def _prompts(n, seed):
    """iid tokens with a skewed distribution (token 3 is 30%) and no positional structure."""
    rng = np.random.default_rng(seed)
    p = np.full(V, 0.7 / (V - 1))
    p[3] = 0.3
    ids = rng.choice(V, size=(n, L), p=p).astype(np.int32)
    noise = np.ones_like(ids)
    noise[:, 0] = 0  # a clean (template-like) position that is not scored
    return PromptSet(ids, np.ones_like(ids), noise)


@pytest.mark.slow
def test_inverter_loss_matches_hand_computation_and_reaches_x_t():
    from sgt_jax.transform.inverters import make_inverter, inverter_loss

    model = make_inverter("mlp", D, V, nnx.Rngs(0), hidden=32)
    x = jax.random.normal(jax.random.key(1), (2, 5, D))
    ids = jnp.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]])
    mask = jnp.array([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], bool)
    ce, acc = inverter_loss(model, x, ids, mask)
    logits = np.asarray(model(x), np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(ids)[..., None], -1)[..., 0]
    m = np.asarray(mask)
    assert float(ce) == pytest.approx(nll[m].mean(), rel=1e-5)
    assert float(acc) == pytest.approx((logits.argmax(-1) == np.asarray(ids))[m].mean())
    grad = jax.grad(lambda x_: inverter_loss(model, x_, ids, mask)[0])(x)
    assert float(jnp.abs(grad[~mask]).max()) == 0.0 and float(jnp.abs(grad[mask]).max()) > 0.0


@pytest.mark.slow
@pytest.mark.parametrize("case", ["identity", "pure_noise"])
def test_attacks_on_identity_recover_all_and_on_pure_noise_fall_to_majority(case):
    table = _table()
    sigma = 0.0 if case == "identity" else 1000.0 * float(jnp.abs(table).max())  # mu = 0, huge sigma
    train, held_out = _prompts(384, 1), _prompts(96, 2)
    res = run_attacks(gaussian_transform(table, sigma=sigma), table, train, held_out, steps=120, batch_size=32,
                      key=jax.random.key(0), ceiling=False)
    truth = held_out.input_ids[held_out.targets]
    majority = 100.0 * np.mean(truth == 3)  # the skewed token, counted independently of the code
    assert res["majority_baseline"]["top1"] == pytest.approx(majority)
    learned = ("mlp", "transformer")
    for name in ("nn_cosine", "nn_l2") + learned:
        assert res[name]["positions"] == truth.size
        if case == "identity":
            assert res[name]["top1"] >= 99.0, (name, res[name])
        elif name in learned:
            assert abs(res[name]["top1"] - majority) <= 2.0, (name, res[name], majority)
    for name in learned:  # the bound: never above H(T); about nothing from pure noise
        leak = res[name]["leakage"]
        slack = 0.15 + 3 * leak["stderr_bits"]
        assert leak["bits"] <= leak["entropy_bits"] + slack, (name, leak)
        if case == "pure_noise":
            assert abs(leak["bits"]) < slack, (name, leak)
    if case == "identity":  # the per-token MLP converges within these steps: it reads nearly all of H(T)
        assert res["mlp"]["leakage"]["bits"] >= res["mlp"]["leakage"]["entropy_bits"] - 0.15, res["mlp"]["leakage"]


def test_eval_prompts_never_in_training_data():
    train, held_out = _prompts(20, 1), _prompts(6, 2)
    assert_disjoint(train, held_out)
    leaky = PromptSet(*(np.concatenate([a, b[:2]]) for a, b in zip(
        (train.input_ids, train.attention_mask, train.noise_mask),
        (held_out.input_ids, held_out.attention_mask, held_out.noise_mask))))
    with pytest.raises(AssertionError, match="2 evaluation prompt"):
        assert_disjoint(leaky, held_out)
    with pytest.raises(AssertionError):
        run_attacks(gaussian_transform(_table()), _table(), leaky, held_out, attacks=("nn",), key=jax.random.key(0))
    assert len(leaky.without(held_out)) == len(train)
    assert_disjoint(leaky.without(held_out), held_out)


def test_fresh_noise_per_example_and_epoch():
    data = _prompts(4, 3)
    tf = gaussian_transform(_table(), sigma=1.0)
    seen = {}
    for epoch, rows, batch in noised_batches(data, tf, jax.random.key(0), batch_size=4, steps=3):
        for r, x in zip(rows, np.asarray(batch["x_t"])):
            seen.setdefault(int(r), []).append(x)
    assert sorted(seen) == [0, 1, 2, 3] and all(len(v) == 3 for v in seen.values())  # 3 epochs of 4 examples
    clean = np.asarray(_table())[data.input_ids]
    for r, views in seen.items():
        noisy = data.targets[r]
        for a in range(3):
            np.testing.assert_array_equal(views[a][~noisy], clean[r][~noisy])  # clean positions stay clean
            for b in range(a + 1, 3):
                assert np.abs(views[a][noisy] - views[b][noisy]).min() > 0  # new noise every epoch
    again = [np.asarray(b["x_t"]) for _, _, b in noised_batches(data, tf, jax.random.key(0), batch_size=4, steps=1)]
    first = np.stack([seen[int(r)][0] for r in next(noised_batches(data, tf, jax.random.key(0), batch_size=4,
                                                                   steps=1))[1]])
    np.testing.assert_array_equal(again[0], first)  # and reproducible from the key


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    from sgt_jax import config as config_lib
    from sgt_jax.inference.artifact import save_artifact
    from sgt_jax.transform.cloak import TransformerCloak
    from sgt_jax.data import load_tokenizer
    from tiny_checkpoints import make_tiny_model_dir
    from sgt_jax.training.trainer import model_fingerprint

    root = tmp_path_factory.mktemp("attack")
    model_dir = make_tiny_model_dir(root / "model", hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                    num_key_value_heads=2, corpus_examples=100)
    tokenizer = load_tokenizer(str(model_dir))
    runs = []
    for alpha, std_bias in ((0.3, 0.02), (0.7, 0.2)):
        run = root / f"run_alpha{alpha}"
        cfg = config_lib.load_config(None, [
            f"model.path={model_dir}", "model.dtype=float32", f"tracking.run_dir={run}", f"objective.alpha={alpha}",
            "data.synthetic_num_examples=60", "data.validation_fraction=0.2", "data.batch_size=4",
            "data.max_length=256", "data.buckets=[256]", "data.num_workers=0", f"data.cache_dir={root / 'cache'}",
            "cloak.scale=[1e-4,1.0]",
        ])
        saved = config_lib.to_dict(cfg)
        saved["base_model_fingerprint"] = model_fingerprint(model_dir)
        cloak = TransformerCloak.from_config(cfg.cloak, str(model_dir), rngs=nnx.Rngs(0))
        cloak.std_head.bias[...] = cloak.std_head.bias[...] * 0 + std_bias
        save_artifact(run / "sgt", params=nnx.state(cloak, nnx.Param), cloak_config=cfg.cloak, model_dir=model_dir,
                      fingerprint=saved["base_model_fingerprint"], tokenizer=tokenizer, training_config=saved)
        runs.append(run)
    return root, runs


@pytest.mark.slow
def test_attack_cli_then_frontier(tiny_runs, capsys):
    import matplotlib.image

    from sgt_jax.training.attack_run import main

    root, runs = tiny_runs
    reports = []
    for i, run in enumerate(runs):
        attacks = "mlp,transformer" if i == 0 else "mlp"
        assert main(["--sgt", str(run), "--steps", "30", "--threat-model", "lookup,white-box", "--attacks", attacks,
                     "--exact-positions", "16", "--exact-candidates", "8", "--batch-size", "8"]
                    + ([] if i == 0 else ["--no-ceiling"])) == 0
        report = json.loads((run / "attack_report.json").read_text())
        assert report["data"]["train_prompts"] >= 40 and report["data"]["eval_prompts"] >= 8
        sections = report["threat_models"]
        assert set(sections) == {"lookup", "white-box"}
        assert set(sections["lookup"]["attacks"]) == {"nn_cosine", "nn_l2"}
        assert set(sections["white-box"]["attacks"]) == set(attacks.split(","))
        for sec in sections.values():
            for res in sec["attacks"].values():
                assert 0 <= res["top1"] <= res["top5"] <= 100
                assert ("clean" in res) == (i == 0) and (i or 0 <= res["clean"]["top1"] <= 100)
                assert {"q10", "q50", "q90"} <= set(res["per_sequence_top1"])
            assert sec["recovery_top1"] == max(r["top1"] for r in sec["attacks"].values())
        exact = sections["white-box"]["exact_channel"]
        assert exact["positions"] == 16 and exact["candidates"] == 8
        figures = [exact["bits"]] + [r["leakage"]["bits"] for r in sections["white-box"]["attacks"].values()]
        assert report["leakage"]["bits"] == max(figures)
        assert report["training"]["alpha"] in (0.3, 0.7)
        (run / "eval_report.json").write_text(json.dumps({"forward": {"top1_agreement": 0.9 - 0.1 * i},
                                                          "generation": {"rougeL_fmeasure": 0.5}}))
        reports.append(report)
    out = capsys.readouterr().out
    assert "SGT attacks" in out and "privacy (white-box)" in out and "privacy (lookup)" in out
    assert list((runs[0] / "tensorboard").glob("events*"))

    png = root / "plots" / "frontier.png"
    assert main(["--frontier", str(runs[1]), str(runs[0]), "--out", str(png)]) == 0
    assert matplotlib.image.imread(str(png)).shape[0] > 100
    points = json.loads((root / "plots" / "frontier.png.json").read_text())["points"]
    assert [p["training"]["alpha"] for p in points] == [0.7, 0.3]
    for p, report, agreement in zip(points, reports[::-1], (0.8, 0.9)):
        for threat, sec in report["threat_models"].items():
            assert p["recovery"][threat] == sec["recovery_top1"]
            assert p["plotted"][threat][:2] == pytest.approx([sec["recovery_top1"], 100 * agreement])
        assert p["leakage_bits"] == report["leakage"]["bits"]
        assert p["top1_agreement"] == agreement


def test_bad_paths_and_empty_data_are_one_line_errors(tiny_runs, tmp_path, capsys):
    from sgt_jax.training.attack_run import main

    _, runs = tiny_runs
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for argv in (["--sgt", str(tmp_path / "missing")], ["--frontier", str(tmp_path)],
                 ["--sgt", str(runs[0]), "--threat-model", "lookup", "--eval-data", str(empty)],
                 ["--sgt", str(runs[0]), "--threat-model", "lookup", "--attacks", "nn,mlp"],
                 ["--sgt", str(runs[0]), "--threat-model", "lookup,oracle"],
                 ["--sgt", str(runs[0]), "--threat-model", "white-box", "--attacks", ""],
                 ["--sgt", str(runs[0]), "--threat-model", "server", "--server-attacks", "transfer",
                  "--transfer-sgt", str(tmp_path / "no_sgt")]):
        assert main(argv) == 2, argv
        # Progress logging (INFO) may precede the failure; the error itself is one last line, no traceback.
        err = capsys.readouterr().err.strip()
        assert err.splitlines()[-1].startswith("error:") and "Traceback" not in err, err
