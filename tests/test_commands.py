"""The command sections of the schema: evaluate, attack, sweep and bench read their settings as
``section.key=value`` or as the same setting spelled ``--key value``, typed and checked like the run's."""

import dataclasses

import pytest

from sgt_jax.config import ConfigError, reference_markdown
from sgt_jax.config.commands import COMMANDS, BenchCommand, parse_command


def parse(section, argv):
    return parse_command(section, argv, prog="test")


def test_a_flag_and_a_section_key_are_the_same_setting_and_other_keys_override_the_run():
    flags, rest = parse("attack", ["--sgt", "runs/a", "--steps", "600", "--no-ceiling", "--threat-model=lookup",
                                   "data.max_length=64"])
    keys, rest2 = parse("attack", ["attack.sgt=runs/a", "attack.steps=600", "attack.ceiling=false",
                                   "attack.threat_model=lookup", "data.max_length=64"])
    assert flags == keys and rest == rest2 == ["data.max_length=64"]
    assert (flags.sgt, flags.steps, flags.ceiling, flags.threat_model) == ("runs/a", 600, False, "lookup")
    assert parse("attack", [])[0].ceiling is True and parse("attack", [])[0].steps == 1500


def test_lists_take_several_values_and_repeated_flags_add():
    args, rest = parse("attack", ["--frontier", "a", "b", "c", "--out", "f.png"])
    assert args.frontier == ["a", "b", "c"] and args.out == "f.png" and rest == []
    assert parse("attack", ["attack.frontier=[a, b]", "attack.frontier=c"])[0].frontier == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="is not a list"):
        parse("attack", ["attack.frontier=[a, b"])
    args, rest = parse("sweep", ["--out", "o", "--setting", "x=1 y=2", "--setting", "z=3", "sweep.setting=w=4",
                                 "train.max_steps=5", "--no-transfer"])
    assert args.setting == ["x=1 y=2", "z=3", "w=4"] and rest == ["train.max_steps=5"] and args.transfer is False


def test_booleans_and_choices_are_typed():
    args, rest = parse("bench", ["--memory-only", "--no-donate", "--shape", "small", "--remat", "full"])
    assert (args.memory_only, args.donate, args.shape, rest) == (True, False, "small", ["model.remat_policy=full"])
    args, _ = parse("evaluate", ["--format", "chat"])
    assert args.format == "chat"
    with pytest.raises(ConfigError, match="evaluate.format='html' is not one of alpaca, openorca, chat, text"):
        parse("evaluate", ["--format", "html"])


@pytest.mark.parametrize("argv, words", [
    (["--shape", "huge"], ["bench.shape", "'huge'", "tiny, small, llama2-7b"]),
    (["--prefetch", "x"], ["prefetch", "x"]),
    (["--steps", "many"], ["steps", "many"]),
    (["--nope", "1"], ["--nope", "--batch", "--help"]),
    (["bench.nope=1"], ["bench.nope"]),
    (["--steps"], ["--steps needs a value"]),
    (["stray"], ["'stray'"]),
])
def test_bad_settings_are_one_line_errors_naming_the_setting(argv, words):
    with pytest.raises(ConfigError) as err:
        parse("bench", argv)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_help_prints_every_setting_from_its_metadata(capsys):
    with pytest.raises(SystemExit) as done:
        parse_command("sweep", ["--help"], prog="python -m sgt_jax.privacy_sweep", doc="Sweep the frontier.")
    out = capsys.readouterr().out
    assert done.value.code == 0 and "Sweep the frontier." in out
    for f in dataclasses.fields(COMMANDS["sweep"]):
        assert f"`sweep.{f.name}`" in out and f.metadata["help"].split(".")[0] in out


def test_the_reference_holds_every_command_section():
    text = reference_markdown()
    for section, cls in COMMANDS.items():
        assert f"### `{section}`" in text
        assert all(f"`{section}.{f.name}`" in text for f in dataclasses.fields(cls))


def test_the_commands_take_their_settings_from_the_schema(tmp_path, capsys):
    """Each command's entry point reads its section: a bad value of it fails as the schema says, with exit 2."""
    from sgt_jax.evaluation.evaluate import main as evaluate_main
    from sgt_jax.tools.benchmark import SHAPES, bench_config, parse_args
    from sgt_jax.tools.privacy_sweep import main as sweep_main
    from sgt_jax.training.attack_run import main as attack_main

    # the bench's model, objective and optimizer flags spell the run's own keys
    assert parse_args(["--batch", "4", "bench.seq=32", "--dtype", "float32", "--accum=2", "cloak.seed=1"]) == (
        BenchCommand(batch=4, seq=32), ["model.dtype=float32", "optimizer.grad_accum_steps=2", "cloak.seed=1"])
    with pytest.raises(ConfigError, match="bench.batch=3 is not a multiple of optimizer.grad_accum_steps=2"):
        bench_config(BenchCommand(batch=3), SHAPES["tiny"], tmp_path, ["optimizer.grad_accum_steps=2"])
    cfg = bench_config(BenchCommand(base_layers=3), SHAPES["tiny"], tmp_path, ["model.remat_policy=full"])
    assert (cfg.model.truncate_at_layer, cfg.model.remat_policy) == (2, "full")
    assert evaluate_main(["--sgt", str(tmp_path), "--seed", "x"]) == 2
    assert attack_main(["--sgt", str(tmp_path), "attack.steps=x"]) == 2
    assert sweep_main(["--setting", "a=1"]) == 2  # no --out
    assert evaluate_main([]) == 2
    err = capsys.readouterr().err
    assert "seed" in err and "steps" in err and "--out" in err and "--sgt" in err
