"""One error hierarchy: every error a user can cause is an SGTError, which the CLIs print as one line with
exit code 2 (a traceback from inside the package is a bug, not a message)."""

import importlib
import inspect
import pkgutil

import pytest

import sgt_jax
from sgt_jax.errors import SGTError, run_cli

# Raised for a configuration that compiles but does not fit the chip: its own exit code (3), not a user error.
NOT_USER_ERRORS = {"CompileFitError"}


def _package_modules():
    for info in pkgutil.walk_packages(sgt_jax.__path__, "sgt_jax."):
        if ".tools" in info.name or info.name.endswith("__main__"):
            continue
        yield importlib.import_module(info.name)


def test_every_error_class_of_the_package_is_an_sgt_error():
    found = {}
    for module in _package_modules():
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__ == module.__name__:
                found[name] = obj
    assert {"ConfigError", "DataError", "ModelLoadError", "AttentionConfigError", "CheckpointError",
            "ArtifactError", "CloakConfigError", "MeshConfigError"} <= set(found)
    strays = sorted(n for n, c in found.items() if not issubclass(c, SGTError) and n not in NOT_USER_ERRORS)
    assert not strays, f"user-facing errors outside the SGTError hierarchy: {strays}"


@pytest.mark.parametrize("impl", ["cudnn", "splash"])
def test_an_attention_kernel_the_backend_lacks_is_one_line_exit_2(impl, capsys):
    from sgt_jax.models.attention import check_attention_impl

    assert run_cli(lambda: check_attention_impl(impl)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.attention_impl=") and "\n" not in err, err


def test_a_bad_attention_kernel_through_the_train_cli_is_one_line_exit_2(capsys, tmp_path):
    from sgt_jax.train import main

    assert main([f"tracking.run_dir={tmp_path}", "model.attention_impl=flash"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "model.attention_impl" in err and "\n" not in err, err


def test_messages_are_folded_to_one_line():
    assert str(SGTError("a\n  b\tc")) == "a b c"
    assert isinstance(SGTError("x"), ValueError)  # code that caught ValueError keeps working
