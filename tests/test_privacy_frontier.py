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


def test_the_committed_privacy_switch_points_are_their_runs_reports():
    """benchmarks/privacy_objectives.json (the switches against the recommendations' frontier): every switch was
    run (the fresh adversary at four or more settings), every row's numbers are its run's own reports, and the
    recommendations' recovery each is compared with is never worse than a measured recommendations point with at
    least its agreement."""
    import math

    rows = json.loads((BENCH / "privacy_objectives.json").read_text())
    assert (BENCH / "privacy_objectives.png").stat().st_size > 10_000
    # The posterior penalty's runs cost about three times the others': one setting was measured.
    for name, runs in (("fresh adversary", 4), ("posterior penalty", 1), ("bounded mean", 2)):
        assert len([r for r in rows if r["objective"] == name]) >= runs, name
    baseline = json.loads((BENCH / "privacy_frontier.json").read_text())
    for r in rows:
        run = BENCH / "results" / "privacy_objectives" / r["run"]
        report = json.loads((run / "attack_report.json").read_text())
        point = json.loads((run / "privacy_point.json").read_text())
        assert r["top1_agreement"] == pytest.approx(100 * point["top1_agreement"])
        for threat, sec in report["threat_models"].items():
            assert r["recovery"][threat] == pytest.approx(sec["recovery_top1"]), (run.name, threat)
        assert f"train.max_steps={r['steps']}" in point["settings"]
        reference = r["recommendations_white_box_at_agreement"]
        if reference is None or math.isnan(reference):
            continue
        same = [(100 * b["top1_agreement"], b["recovery"]["white-box"]) for b in baseline
                if b["training"]["max_steps"] == r["steps"]]
        # Never a straw man: at most the best measured recommendations point with at least this agreement.
        assert reference <= min(rec for agr, rec in same if agr >= r["top1_agreement"]) + 1e-6, run.name
        assert r["gap"] == pytest.approx(reference - r["recovery"]["white-box"])
