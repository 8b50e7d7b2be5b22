"""Tracking: tensorboard event files read back, progress bar, end-of-run summary."""

import io
import sys

import numpy as np
import pytest

from sgt_jax.config import SGTConfig, TrackingConfig, to_dict
from sgt_jax.tracking import ProgressBar, Tracker, markdown_table, read_events, summary_table


def test_scalars_histograms_and_text_table_are_written(tmp_path):
    tracker = Tracker(tmp_path / "run", config={"optimizer": {"learning_rate": 3e-5}, "model": {"path": "m"}})
    tracker.scalars(10, {"loss/total": 1.25, "lr": np.float32(3e-5), "not_a_number": "x"})
    tracker.scalars(20, {"loss/total": 0.75})
    sigma = np.linspace(0.0, 1.0, 1000)
    tracker.histograms(10, {"cloak/sigma": sigma, "cloak/with_inf": np.array([1.0, np.inf, 2.0])})
    rows = [
        {"prompt": "What is 2|3?", "reconstruction": "line one\nline two", "sgt_generation": "five"},
        {"prompt": "Hello", "reconstruction": "hi", "sgt_generation": "hey"},
    ]
    tracker.text_table(10, "generations", rows)
    tracker.close()

    events = read_events(tracker.log_dir)
    assert events["loss/total"] == [(10, 1.25), (20, 0.75)]
    assert events["lr"][0][0] == 10 and events["lr"][0][1] == pytest.approx(3e-5)
    assert "not_a_number" not in events

    (step, histo), = events["cloak/sigma"]
    assert step == 10 and histo.num == 1000
    assert histo.min == 0.0 and histo.max == 1.0 and histo.sum == pytest.approx(sigma.sum())
    assert events["cloak/with_inf"][0][1].num == 2  # non-finite values are dropped

    (step, table), = events["generations/text_summary"]
    assert step == 10
    lines = table.splitlines()
    assert lines[0] == "| prompt | reconstruction | sgt_generation |"
    assert lines[2] == "| What is 2\\|3? | line one<br>line two | five |"
    assert lines[3] == "| Hello | hi | hey |"

    config_text = events["config/text_summary"][0][1]
    assert "| optimizer.learning_rate | 3e-05 |" in config_text and "| model.path | m |" in config_text


def test_from_config_and_tensorboard_off(tmp_path):
    cfg = TrackingConfig(run_dir=str(tmp_path / "run"), tensorboard=False)
    tracker = Tracker.from_config(cfg, to_dict(SGTConfig()))
    tracker.scalars(1, {"loss": 1.0})
    tracker.close()
    assert not list((tmp_path / "run").rglob("events.out.tfevents.*"))


def test_wandb_enabled_but_missing_warns_and_keeps_going(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.warns(UserWarning, match="wandb is not installed"):
        tracker = Tracker(tmp_path, wandb=True)
    tracker.scalars(1, {"loss": 2.0})
    tracker.text_table(1, "t", [{"a": "b"}])
    tracker.close()
    assert read_events(tracker.log_dir)["loss"] == [(1, 2.0)]


def test_markdown_table_union_of_columns():
    assert markdown_table([{"a": 1}, {"b": "x"}]) == "| a | b |\n|---|---|\n| 1 |  |\n|  | x |"
    assert markdown_table([]) == ""


def test_progress_bar_shows_step_tokens_and_loss():
    stream = io.StringIO()
    with ProgressBar(100, initial=10, file=stream, mininterval=0) as bar:
        bar.update(12, tokens_per_s=12345.6, loss=0.123456)
        assert bar.n == 12
        bar.update(15, tokens_per_s=1000.0, loss=0.5)
        assert bar.n == 15
    out = stream.getvalue()
    assert "15/100" in out and "tok/s=1,000" in out and "loss=0.5" in out


def test_progress_bar_disabled_is_silent(capsys):
    stream = io.StringIO()
    bar = ProgressBar.from_config(TrackingConfig(progress_bar=False), 100, file=stream)
    assert not bar.enabled
    bar.update(5, tokens_per_s=1.0, loss=1.0)
    assert bar.n == 0
    bar.close()
    assert stream.getvalue() == ""
    assert capsys.readouterr().err == ""


def test_summary_table_contains_values():
    text = summary_table({"steps": 1200, "final loss": 0.4321987, "tokens/s": 15234.5, "artifact": "runs/sgt/sgt",
                          "lr": 3e-5})
    lines = text.splitlines()
    assert "Run summary" in lines[1]
    assert len({len(line) for line in lines}) == 1  # a proper box
    assert "1,200" in text and "0.4322" in text and "15234.5000" in text and "runs/sgt/sgt" in text
    assert "3.0000e-05" in text
    assert len(lines) <= 30


def test_summary_table_wraps_a_sentence_but_never_a_path():
    sentence = "this SGT does not hide tokens from a learned attacker: it recovers 98.8% of transformed tokens"
    lines = summary_table({"steps": 3, "privacy": sentence}).splitlines()
    assert len({len(line) for line in lines}) == 1  # still a proper box
    wrapped = [line.strip("|").strip() for line in lines[3:-1] if "steps" not in line]
    assert len(wrapped) >= 2 and " ".join(wrapped).replace("privacy", "", 1).split() == sentence.split()

    path = "/a/very/long/run/directory/" + "x" * 70 + "/sgt"
    lines = summary_table({"artifact": path, "privacy": sentence}).splitlines()
    assert len({len(line) for line in lines}) == 1
    assert any(path in line for line in lines)  # whole on one line: copyable
