"""Multi-host correctness on a simulated pod: N local processes of ``python -m sgt_jax.train`` (several
simulated CPU devices each, jax.distributed over 127.0.0.1, gloo collectives) against one process holding
all the devices, with the recipes' features switched on: buckets, gradient accumulation, time-based
validation and checkpoints on clocks that disagree between the hosts, and a SIGTERM that reaches one host.

Cheap by design (2 cores in CI): a 2-layer hidden-64 model, 4 optimizer steps, 40 short examples, and the
scenarios share launches: the uninterrupted two-process run is both the run compared with one process and
the bitwise reference of the interrupted-and-resumed one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import computed_once, cpu_heavy_lock

import numpy as np
import pytest

STEPS = 4
COMPARED_STEPS = 3  # losses agree within 1e-5 across topologies for these (see tests/test_train.py)
BUCKETS = (32, 64, 128)
MESH = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
# One process's clock runs 120x fast: one simulated minute every half second, so it wants to validate and
# save every minute by time while the other's (real) clock never does within the run. Validations are
# agreed over both; Orbax's time-based save is decided by process 0 (the primary host) and broadcast.
SKEWED_CLOCK = "120,1000"
# Share of long examples: with the corpus seed below, every global batch of the 4 steps pads to 128 (one
# compiled shape per launch: cheap) while in 3 of them one host's own share would pick 64 (checked below).
P_LONG = 0.35
CORPUS_SEED = 8
ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tiny_checkpoints import make_tiny_model_dir

    return str(make_tiny_model_dir(tmp_path_factory.mktemp("model") / "tiny", num_hidden_layers=2))


def spread_corpus(path, model_dir, num_examples=40, seed=CORPUS_SEED):
    """A plain-text corpus whose token lengths fall in all three buckets (checked with the tokenizer)."""
    from transformers import AutoTokenizer

    from sgt_jax.data import generate_corpus

    words = " ".join(" ".join(str(r[k]) for k in ("instruction", "output")) for r in generate_corpus(50, 5)).split()
    rng = np.random.default_rng(seed)
    ranges = [(2, 7), (13, 18), (28, 38)]  # words; mostly short, as in chat data
    texts = []
    for i in range(num_examples):
        low, high = ranges[rng.choice(3, p=[(1 - P_LONG) * 0.6, (1 - P_LONG) * 0.4, P_LONG])]
        start = int(rng.integers(0, len(words) - high))
        texts.append(f"item {i} " + " ".join(words[start:start + int(rng.integers(low, high))]))
    tok = AutoTokenizer.from_pretrained(model_dir)
    lengths = [len(tok(t + tok.eos_token)["input_ids"]) for t in texts]
    assert all(n <= BUCKETS[-1] for n in lengths), max(lengths)
    in_bucket = np.digitize(lengths, [BUCKETS[0] + 1, BUCKETS[1] + 1])
    assert np.bincount(in_bucket, minlength=3).min() >= 4, np.bincount(in_bucket)
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return str(path), texts


def overrides(model_dir, corpus, run_dir, **extra):
    settings = {
        "model.path": model_dir, "model.dtype": "float32", "model.truncate_at_layer": 0,
        "cloak.seed": 7, "train.seed": 0,
        "train.max_steps": STEPS,
        "data.source": corpus, "data.format": "text", "data.validation_fraction": 0.1,
        "data.batch_size": 4, "optimizer.grad_accum_steps": 2,
        "data.max_length": BUCKETS[-1], "data.buckets": "[" + ",".join(map(str, BUCKETS)) + "]",
        "data.num_workers": 0, "data.cache_dir": str(Path(corpus).parent / "cache"),
        "optimizer.learning_rate": 1e-5, "optimizer.warmup_steps": 0, "optimizer.schedule": "constant",
        "validation.every_steps": "null", "validation.every_minutes": 1, "validation.max_batches": 1,
        "validation.generation_examples": 0, "validation.perplexity": "false",
        "checkpoint.every_steps": 2, "checkpoint.every_minutes": 1, "checkpoint.keep": 10,
        "checkpoint.async_save": "false",
        "tracking.log_every_steps": 1, "tracking.histogram_every_steps": 1000, "tracking.progress_bar": "false",
        "tracking.run_dir": run_dir, **MESH,
    }
    settings.update(extra)
    return [f"{k}={v}" for k, v in settings.items()]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(settings, log_dir, *, processes, devices, clocks=(), cache=None):
    """Start ``processes`` processes of ``python -m sgt_jax.train`` (process i on the skewed clock ``clocks[i]``
    when given, see tests/_skewed_clock_worker.py); their stderr goes to log_dir/p<i>.log."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    empty = log_dir / "schema_defaults.yaml"
    empty.write_text("{}\n")
    port = free_port()
    procs = []
    for i in range(processes):
        cluster = [] if processes == 1 else [
            "mesh.distributed=true", f"mesh.coordinator_address=127.0.0.1:{port}",
            f"mesh.num_processes={processes}", f"mesh.process_id={i}"]
        env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        if cache is not None:  # launches of the same topology share their compiled steps
            env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                       JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        clock = clocks[i] if i < len(clocks) else None
        entry = [str(ROOT / "tests" / "_skewed_clock_worker.py"), clock] if clock else ["-m", "sgt_jax.train"]
        cmd = ["nice", "-n", "5", sys.executable, *entry, "--config", str(empty), *settings, *cluster]
        err = open(log_dir / f"p{i}.log", "w")
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT))
        LAUNCHED.append(procs[-1])
        err.close()
    return procs


LAUNCHED: list = []  # every process this module started, killed at the end of the module whatever happened


@pytest.fixture(scope="module", autouse=True)
def _kill_leftovers():
    yield
    for proc in LAUNCHED:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait(procs, log_dir, timeout=400):
    deadline = time.time() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        raise AssertionError("a process hung:\n" + "\n".join(log_tail(log_dir, i) for i in range(len(procs))))
    codes = [p.returncode for p in procs]
    assert codes == [0] * len(procs), (codes, "\n".join(log_tail(log_dir, i) for i in range(len(procs))))


def log_text(log_dir, i):
    return (Path(log_dir) / f"p{i}.log").read_text()


def log_tail(log_dir, i):
    return f"--- process {i} ---\n" + log_text(log_dir, i)[-3000:]


def logged_steps(log_dir, i, pattern):
    return [int(m) for m in re.findall(pattern, log_text(log_dir, i))]


def losses(run_dir):
    from sgt_jax.tracking import read_events

    return [v for _, v in sorted(read_events(Path(run_dir) / "tensorboard")["train/loss"])]


def complete_steps(run_dir):
    from sgt_jax.training.checkpoint import Checkpointer

    with Checkpointer(Path(run_dir) / "checkpoints", every_minutes=None) as ckpt:
        return ckpt.complete_steps()


def cloak_bytes(run_dir):
    files = sorted((Path(run_dir) / "sgt").glob("*.safetensors"))
    assert files, f"no artifact in {run_dir}"
    return [f.read_bytes() for f in files]


@pytest.fixture(scope="module")
def pod(model_dir, tmp_path_factory):
    """Four launches: two processes x 4 devices uninterrupted (U) beside one process x 8 devices (S); then
    two processes with a SIGTERM to process 1 only (I); then both relaunched (R). Once per session, whichever
    pytest-xdist worker needs it first."""
    return computed_once(tmp_path_factory, "multihost_pod", lambda: _pod(model_dir, tmp_path_factory),
                         paths=("run_dir", "logs"))


def _pod(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pod")
    corpus, _ = spread_corpus(tmp / "corpus.jsonl", model_dir)
    runs = {"corpus": corpus}
    runs.update({name: {"run_dir": tmp / name, "logs": tmp / f"{name}_logs"} for name in "USIR"})
    runs["R"]["run_dir"] = runs["I"]["run_dir"]
    runs["model_dir"] = model_dir
    timings = {}
    with cpu_heavy_lock(tmp_path_factory):
        _launch_pod(model_dir, runs, tmp, corpus, timings)
    print("multi-host launch timings (s):", {k: round(v, 1) for k, v in timings.items()})
    return runs


def _launch_pod(model_dir, runs, tmp, corpus, timings):
    started = time.time()
    u = launch(overrides(model_dir, corpus, runs["U"]["run_dir"]), runs["U"]["logs"], processes=2, devices=4,
               clocks=(SKEWED_CLOCK, None), cache=tmp / "jax_cache")
    s = launch(overrides(model_dir, corpus, runs["S"]["run_dir"], **{
        "mesh.distributed": "false", "validation.every_minutes": "null", "checkpoint.every_minutes": "null"}),
               runs["S"]["logs"], processes=1, devices=8)
    wait(u, runs["U"]["logs"])
    wait(s, runs["S"]["logs"])
    timings["U+S"] = time.time() - started

    started = time.time()
    interrupted = launch(overrides(model_dir, corpus, runs["I"]["run_dir"]), runs["I"]["logs"], processes=2,
                         devices=4, clocks=(None, SKEWED_CLOCK), cache=tmp / "jax_cache")
    # The loop has started (the preemption guard is installed) once this line is logged; the first step
    # still has to compile, so the signal lands before step 1's decisions.
    deadline = time.time() + 300
    while "training from step 0" not in log_text(runs["I"]["logs"], 1):
        assert all(p.poll() is None for p in interrupted), log_tail(runs["I"]["logs"], 1)
        assert time.time() < deadline, "process 1 never started its loop"
        time.sleep(0.05)
    interrupted[1].send_signal(signal.SIGTERM)
    wait(interrupted, runs["I"]["logs"])
    runs["I"]["complete_steps"] = complete_steps(runs["I"]["run_dir"])
    timings["I"] = time.time() - started

    started = time.time()
    wait(launch(overrides(model_dir, corpus, runs["R"]["run_dir"]), runs["R"]["logs"], processes=2, devices=4,
                clocks=(SKEWED_CLOCK, None), cache=tmp / "jax_cache"), runs["R"]["logs"])
    timings["R"] = time.time() - started


@pytest.mark.slow
def test_two_hosts_agree_and_match_one_host(pod):
    """2 processes x 4 devices (data=2, fsdp=2, tensor=2) with buckets [32, 64, 128], accumulation 2 and
    time-based validation/checkpoints on clocks that disagree: both exit 0 (no host entered a validation or
    a save alone), the losses at steps 1-3 equal the 1-process 8-device run's within 1e-5, and the
    validations and saves happened at the same steps on both. Fails on per-host buckets (different global
    shapes), per-host time decisions (a hang, caught by the timeout), or a data/accumulation mismatch."""
    from sgt_jax.config import DataConfig
    from sgt_jax.data import build_datasets, load_tokenizer

    # The run really has host shares that would fall in different buckets on their own.
    cfg = DataConfig(source=pod["corpus"], format="text", validation_fraction=0.1, batch_size=4, num_workers=0,
                     max_length=BUCKETS[-1], buckets=list(BUCKETS), cache_dir=str(Path(pod["corpus"]).parent / "c"))
    tok = load_tokenizer(pod["model_dir"])
    shares = [list(build_datasets(cfg, tok, process_index=p, process_count=2, grad_accum_steps=2)[0])[:STEPS]
              for p in (0, 1)]
    own = [[min(b for b in BUCKETS if b >= batch["attention_mask"].sum(1).max()) for batch in h] for h in shares]
    assert own[0] != own[1], own

    u, s = pod["U"], pod["S"]
    one, two = losses(s["run_dir"]), losses(u["run_dir"])
    assert len(one) == len(two) == STEPS
    np.testing.assert_allclose(two[:COMPARED_STEPS], one[:COMPARED_STEPS], rtol=0, atol=1e-5)
    validations = [logged_steps(u["logs"], i, r"validation at step (\d+)") for i in (0, 1)]
    # Only process 0's fast clock makes validations due (every_steps is null); they are agreed.
    assert validations[0] == validations[1] and validations[0], validations
    for i in (0, 1):
        assert "global batch per optimizer step: 8 examples" in log_text(u["logs"], i)
        assert logged_steps(u["logs"], i, r"training stopped \(finished\) at step (\d+)") == [STEPS]
    # Saves by steps (2, 4) plus the ones process 0's clock asked for, all complete (every host took part).
    steps = complete_steps(u["run_dir"])
    assert {2, 4} <= set(steps) and len(steps) > 2, steps


@pytest.mark.slow
def test_sigterm_to_one_host_saves_on_both_and_resumes_bitwise(pod):
    """SIGTERM to process 1 only: both processes stop at the same step, save it and exit 0; relaunching
    both resumes there and finishes, and the final cloak (artifact tensors) and the resumed steps' losses
    equal the uninterrupted run's bit for bit. Fails if the stop is decided per host (a hang or one exit
    -15), the save is not collective, or resume changes the data order or the noise."""
    i, r, u = pod["I"], pod["R"], pod["U"]
    stops = [logged_steps(i["logs"], p, r"training stopped \(preempted\) at step (\d+)") for p in (0, 1)]
    assert stops[0] == stops[1] == [1], stops
    assert i["complete_steps"] == [1]
    assert [logged_steps(r["logs"], p, r"resumed from step (\d+)") for p in (0, 1)] == [[1], [1]]
    assert losses(r["run_dir"])[-(STEPS - 1):] == losses(u["run_dir"])[1:]
    assert cloak_bytes(r["run_dir"]) == cloak_bytes(u["run_dir"])


@pytest.mark.slow
def test_accumulation_consumes_every_example_once(model_dir, tmp_path, monkeypatch):
    """grad_accum_steps 4, max_steps null, num_epochs 1: the run takes train size / (batch_size x 4) steps,
    trains on every training example exactly once (rows counted as they enter the train step, compared with
    the tokenizer's own encoding of the corpus), and the linear decay spans exactly those steps (learning
    rates against the hand-computed schedule). Fails if accumulation splits one micro-batch (a quarter of
    the data) or the schedule's length disagrees with the step count."""
    from transformers import AutoTokenizer

    from sgt_jax import config as config_lib
    from sgt_jax.tracking import read_events
    from sgt_jax.train import train
    from sgt_jax.training.trainer import Trainer

    corpus, texts = spread_corpus(tmp_path / "corpus.jsonl", model_dir, num_examples=32, seed=4)
    tok = AutoTokenizer.from_pretrained(model_dir)
    expected = sorted(tuple(tok(t + tok.eos_token)["input_ids"]) for t in texts)
    consumed = []
    original = Trainer.train_step

    def counting_step(self, state, host_batch):
        for ids, mask in zip(host_batch["input_ids"], host_batch["attention_mask"]):
            consumed.append(tuple(ids[mask == 1].tolist()))
        return original(self, state, host_batch)

    monkeypatch.setattr(Trainer, "train_step", counting_step)
    lr = 1e-3
    cfg = config_lib.load_config(None, overrides(model_dir, corpus, tmp_path / "run", **{
        "train.max_steps": "null", "data.num_epochs": 1, "data.validation_fraction": 0.0, "data.batch_size": 2,
        "optimizer.grad_accum_steps": 4, "optimizer.schedule": "linear", "optimizer.learning_rate": lr,
        "optimizer.end_lr_ratio": 0.1, "checkpoint.every_steps": "null", "checkpoint.every_minutes": "null",
        "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1, "data.buckets": "[128]"}))  # one compiled shape
    summary = train(cfg)
    assert summary["steps"] == 32 // (2 * 4)
    assert len(consumed) == 32 and sorted(consumed) == expected
    rates = [v for _, v in sorted(read_events(tmp_path / "run" / "tensorboard")["train/learning_rate"])]
    # Linear decay from lr to 0.1 lr over the 4 steps (step s uses the schedule at s - 1).
    np.testing.assert_allclose(rates, [lr * (1 - 0.9 * s / 4) for s in range(4)], rtol=1e-6)


def test_agree_and_cadence_on_one_process():
    """On one process agree() returns the flags unchanged (no collective); a Cadence fires on its step
    multiples and once its minutes passed on its clock, restarting at reset(). Fails if a flag is dropped or
    inverted, or the cadence ignores time."""
    from sgt_jax.training import loop
    from sgt_jax.training.parallel import agree

    assert agree({"validate": True, "save": False, "exhausted": True}) == {
        "validate": True, "save": False, "exhausted": True}
    now = [0.0]
    cadence = loop.Cadence(every_steps=5, every_minutes=2, clock=lambda: now[0])
    assert [cadence.due(s) for s in (1, 5, 10)] == [False, True, True]
    now[0] = 119.0
    assert not cadence.due(1)
    now[0] = 120.0
    assert cadence.due(1)
    cadence.reset()
    assert not cadence.due(1)


def test_generation_prompts_are_the_same_on_every_host(model_dir, tmp_path):
    """Validation generates from the validation set's first prompts, read from the source: the same list
    whichever process builds the pipeline, and on one process the prompts of its first batch (as before).
    Fails if the prompts come from a host's share (hosts would generate different prompts, of different
    lengths, in one collective program)."""
    from sgt_jax.config import DataConfig
    from sgt_jax.data import build_datasets, load_tokenizer
    from sgt_jax.inference.generate import prompts_from_batch, prompts_from_source

    cfg = DataConfig(source="synthetic", synthetic_num_examples=40, format="alpaca", validation_fraction=0.2,
                     batch_size=4, num_workers=0, max_length=256, buckets=[256], cache_dir=str(tmp_path / "cache"))
    tok = load_tokenizer(model_dir)
    validation = [build_datasets(cfg, tok, process_index=p, process_count=2)[1] for p in (0, 1)]
    prompts = [prompts_from_source(v.source, 3) for v in validation]
    assert prompts[0] == prompts[1] and len(prompts[0]) == 3
    assert len({len(p["input_ids"]) for p in prompts[0]}) > 1  # real prompts, not just bos
    single = build_datasets(cfg, tok, process_index=0, process_count=1)[1]
    assert prompts[0] == prompts_from_batch(next(iter(single)))[:3]
    host_shares = [prompts_from_batch(next(iter(v)))[:3] for v in validation]
    assert host_shares[0] != host_shares[1]  # what the old code generated from
