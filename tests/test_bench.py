"""The benchmark CLI (python -m sgt_jax.bench) and its FLOP model (sgt_jax.tools.flops); no timing assertions."""

import json

import pytest

from sgt_jax.tools import benchmark as bench
from sgt_jax.tools import flops

EXPECTED_KEYS = {"args", "shape", "device_kind", "platform", "compile_s", "step_s_median", "step_s_all",
                 "tokens_per_s", "valid_tokens_per_s", "flops", "peak_flops", "mfu", "peak_memory_bytes",
                 "peak_memory_source", "memory_analysis", "load_average", "date", "final_loss", "loop"}


@pytest.mark.slow
def test_bench_cli_runs_tiny_shape_and_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    bench.main(["--shape", "tiny", "--batch", "2", "--seq", "16", "--base-layers", "2", "--estimator-layers", "1",
                "--steps", "1", "--warmup", "1", "--accum", "2", "--prefetch", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert EXPECTED_KEYS <= set(result)
    assert result["tokens_per_step"] == 32 and result["step_s_median"] > 0 and result["mfu"] > 0
    assert result["flops"]["total"] == result["flops"]["base"] + result["flops"]["cloak"]
    assert result["peak_memory_bytes"] > 0 and result["peak_memory_source"]
    assert result["loop"]["prefetch"] == 1
    assert "tokens_per_s" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_memory_only_lm_with_vocab_chunks(tmp_path):
    out = tmp_path / "m.json"
    bench.main(["--shape", "tiny", "--seq", "16", "--objective", "lm", "--vocab-chunk", "128", "--memory-only",
                "model.dtype=float32", "--out", str(out)])
    result = json.loads(out.read_text())
    run = result["run"]  # the flags and the run-config key=value alike set the benchmarked run
    assert (run["objective.mode"], run["objective.vocab_chunk_size"], run["model.dtype"]) == ("lm", 128, "float32")
    assert "step_s_median" not in result
    assert result["memory_analysis"]["temp_size_in_bytes"] > 0


def test_flop_model_matches_hand_count_for_tiny_config():
    # tiny: D=64, H=4, K=2, hd=16, F=128, V=384; B=2, S=8 (16 tokens), 2 base layers, 1-layer estimators.
    config = bench.decoder_config(hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=384, layers=2)
    dense = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128)  # q, k+v, o, gate+up+down = 73,728
    attention = 4 * 8 * 4 * 16  # Q·K^T and P·V over S x S: 2,048
    assert flops.layer_flops_per_token(config, 8) == (73_728, 2_048) == (dense, attention)
    # ssl: clean + transformed forward (2 x 2 layers x 75,776) + backward to inputs (dense 1x, attention 2x).
    base = 16 * (2 * 2 * (73_728 + 2_048) + 2 * (73_728 + 2 * 2_048))  # 7,340,032
    # cloak: 2 estimators x (1 layer + D x D head) x 3 (forward + backward with weight gradients).
    cloak = 16 * 3 * 2 * (73_728 + 2_048 + 2 * 64 * 64)  # 8,060,928
    got = flops.flop_model(config, batch=2, seq=8, base_layers=2, estimator_layers=1, objective="ssl")
    assert got == {"base": 7_340_032, "cloak": 8_060_928, "total": 15_400_960} == {
        "base": base, "cloak": cloak, "total": base + cloak}
    # lm: one transformed forward + the LM head (2·D·V per token), backward to the hidden state (1x head).
    head = 2 * 64 * 384
    lm = flops.flop_model(config, batch=2, seq=8, base_layers=2, estimator_layers=1, objective="lm")
    assert lm["base"] == 16 * ((2 * 75_776 + head) + (2 * (73_728 + 4_096) + head)) == 6_488_064


def test_peak_flops_table_and_cpu_measurement():
    class Fake:
        device_kind, platform = "NVIDIA H100 80GB HBM3", "gpu"

    peaks = flops.peak_flops(Fake(), "bfloat16")
    assert peaks["base"] == 989e12 and peaks["cloak"] == 67e12
    import jax

    cpu = flops.peak_flops(jax.devices()[0], "float32")
    assert cpu["base"] > 0 and "measured" in cpu["source"]
