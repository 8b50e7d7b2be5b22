"""The committed privacy–utility frontier of the embedded default (benchmarks/privacy_frontier.*): the sweep of the
recommendations' own knobs has at least 12 runs, and every point it plots is that run's own reports."""

import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_the_committed_frontier_plots_its_runs_reports():
    points = json.loads((BENCH / "privacy_frontier.json").read_text())
    assert len(points) >= 12
    assert (BENCH / "privacy_frontier.png").stat().st_size > 10_000
    grid = {(p["training"]["transform_variance_priority"], p["training"]["alpha"]) for p in points
            if p["training"]["max_steps"] == 400}
    assert grid >= {(v, a) for v in (0.01, 0.1, 0.3, 0.5, 1, 2) for a in (0.3, 0.54, 0.8)}
    for p in points:
        run = BENCH / "results" / "privacy_frontier" / Path(p["run_dir"]).name
        report = json.loads((run / "attack_report.json").read_text())
        point = json.loads((run / "privacy_point.json").read_text())
        assert set(report["threat_models"]) == {"lookup", "white-box", "server"}
        assert set(report["threat_models"]["server"]["attacks"]) == {"transfer_mlp", "reader", "lm_prior"}
        for threat, sec in report["threat_models"].items():
            want = [sec["recovery_top1"], 100.0 * point["top1_agreement"], point["utility_loss"]]
            assert p["plotted"][threat] == pytest.approx(want), (run.name, threat)
        assert p["leakage_bits"] == report["leakage"]["bits"]
