"""The package's shape: imports point one way (down the layer order below), no import cycle, no module over
400 lines and no function over 60 (docstrings aside), and nothing in it that only the tests use. Parsed from
the source, function-local imports included, so a dependency cannot hide inside a function."""

import ast
from collections import Counter
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sgt_jax"

# Lower numbers sit lower: a module may import its own layer (other packages of it too, as long as no cycle
# forms) and the layers below, never one above. Entry points (python -m sgt_jax.X) sit on top.
LAYERS = {
    "sgt_jax.errors": 0, "sgt_jax.platforms": 0, "sgt_jax.config": 0, "sgt_jax.tracking": 0, "sgt_jax.assets": 0,
    "sgt_jax.models": 1,
    "sgt_jax.transform": 2, "sgt_jax.data": 2,
    "sgt_jax.inference": 3,
    "sgt_jax.evaluation": 4,
    "sgt_jax.training": 5, "sgt_jax.export": 5,
    "sgt_jax": 6,  # the package root's __init__ and the entry modules: train, evaluate, attack, bench, ...
    "sgt_jax.tools": 6,  # benchmark, FLOP model, privacy sweep: above the runtime, which never imports them
}
# Tools are not runtime: a module of one of these kinds lives in sgt_jax.tools.
TOOL_WORDS = ("benchmark", "flops", "sweep")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    parts = module.split(".")
    return next(LAYERS[".".join(parts[:n])] for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in LAYERS)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every sgt_jax module the file imports, anywhere in it (``from pkg import mod`` resolved to the module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("sgt_jax"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sgt_jax"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: {m for m in imported_modules(path, known) if m in known and m != name}
            for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    # A package's __init__ re-exports its own modules; that is not an upward arrow.
    return sorted(f"{src} (layer {layer(src)}) imports {dst} (layer {layer(dst)})"
                  for src, dsts in graph.items() for dst in dsts
                  if layer(dst) > layer(src) and not dst.startswith(src + "."))


def test_layers_cover_every_subpackage():
    packages = {module_name(p.parent / "__init__.py") for p in PACKAGE.rglob("__init__.py")}
    assert packages <= set(LAYERS), f"give these packages a layer: {sorted(packages - set(LAYERS))}"


def test_no_import_points_up_the_layer_order():
    assert upward_imports(import_graph()) == []


def test_tools_live_in_the_tools_subpackage_and_the_runtime_does_not_import_them():
    misplaced = [m for m in modules() if any(w in m.rsplit(".", 1)[-1] for w in TOOL_WORDS)
                 and not m.startswith("sgt_jax.tools.") and layer(m) < 6]
    assert misplaced == []
    assert sorted(src for src, dsts in import_graph().items() if layer(src) < 6
                  and any(d.startswith("sgt_jax.tools") for d in dsts)) == []


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_the_checks_fire(tmp_path):
    graph = {"sgt_jax.models.a": {"sgt_jax.training.b"}, "sgt_jax.training.b": {"sgt_jax.models.a"}}
    assert find_cycle(graph) == ["sgt_jax.models.a", "sgt_jax.training.b", "sgt_jax.models.a"]
    assert upward_imports(graph) == ["sgt_jax.models.a (layer 1) imports sgt_jax.training.b (layer 5)"]
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from sgt_jax.training import step\n    import sgt_jax.models.decoder\n")
    assert imported_modules(source, {"sgt_jax.training.step"}) == {"sgt_jax.training.step", "sgt_jax.models.decoder"}
    long_fn = tmp_path / "long.py"
    long_fn.write_text('def f():\n    """doc\n\n    more doc\n    """\n' + "    x = 1\n" * 61)
    assert long_functions(long_fn) == [("f", 61)]


def _docstring_lines(node) -> int:
    body = getattr(node, "body", None)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[0].end_lineno - body[0].lineno + 1
    return 0


def long_functions(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.body[0].lineno + 1 - _docstring_lines(node)
            if length > MAX_FUNCTION_LINES:
                out.append((node.name, length))
    return out


def module_lines(path: Path) -> int:
    tree = ast.parse(path.read_text())
    docstrings = sum(_docstring_lines(node) for node in ast.walk(tree)
                     if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))
    return len(path.read_text().splitlines()) - docstrings


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_and_function_sizes(name):
    path = modules()[name]
    assert module_lines(path) <= MAX_MODULE_LINES, f"{path.name}: {module_lines(path)} lines; split it by concern"
    assert long_functions(path) == [], f"{path.name}: functions over {MAX_FUNCTION_LINES} lines"


# -- The package boundary: sgt_jax/ defines nothing that only tests/ use ----------------------------------

REPO = PACKAGE.parent
# The package's users besides itself: scripts, recipes and documentation (naming a name there is a use).
USER_PATHS = ("README.md", "setup.cfg", "tools", "benchmarks", "notebooks", "docs", "launch", "configs")
USER_SUFFIXES = {".py", ".md", ".ipynb", ".sh", ".sbatch", ".yaml", ".yml", ".cfg", ".toml"}
# Methods a library calls on our subclass of its class, so our code never names them.
CALLED_BY_LIBRARIES = {"SGTLM.loglikelihood_rolling": "lm-evaluation-harness", "SGTLM.generate_until": "lm-evaluation-harness"}
# Copied out by the exporter and run without sgt_jax: its names are for the users of the exported directory.
TEMPLATES = {"sgt_jax/export/sgt_torch.py"}


def definitions(tree: ast.Module):
    """(name, label, node) of a module's functions, classes and constants, and of its classes' methods
    (dunders aside: Python calls those)."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.name, node.name, node
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and not item.name.startswith("__"):
                    yield item.name, f"{node.name}.{item.name}", item
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name) and not target.id.startswith("__"):
                    yield target.id, target.id, node


def names_read(tree: ast.AST, *, imports: bool = False) -> Counter:
    """How often each name is read (a variable loaded, an attribute taken) in ``tree``, and imported when
    ``imports``. By name alone: a method shares its count with every same-named method and library call."""
    found = Counter()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            found[node.id] += 1
        elif isinstance(node, ast.Attribute):
            found[node.attr] += 1
        elif imports and isinstance(node, ast.ImportFrom):
            found.update(alias.name for alias in node.names)
    return found


def words_in(paths) -> set[str]:
    import re

    files = [f for p in paths if p.exists() for f in ([p] if p.is_file() else sorted(p.rglob("*")))
             if f.is_file() and f.suffix in USER_SUFFIXES]
    return {w for f in files for w in re.findall(r"[A-Za-z_]\w*", f.read_text(errors="ignore"))}


def names_only_tests_use(package: Path, tests: Path, users) -> list[str]:
    """``path:line label`` of every name ``package`` defines that its own code never reads (outside the
    definition itself) and no user names, but the tests use."""
    trees = {path: ast.parse(path.read_text()) for path in sorted(package.rglob("*.py"))}
    read = sum((names_read(tree) for tree in trees.values()), Counter())
    tested = sum((names_read(ast.parse(p.read_text()), imports=True) for p in sorted(tests.rglob("*.py"))), Counter())
    named_by_users = words_in(users)
    found = []
    for path, tree in trees.items():
        where = path.relative_to(package.parent).as_posix()
        if where in TEMPLATES:
            continue
        for name, label, node in definitions(tree):
            if (read[name] == names_read(node)[name] and tested[name] and name not in named_by_users
                    and label not in CALLED_BY_LIBRARIES):
                found.append(f"{where}:{node.lineno} {label}")
    return found


def test_the_package_defines_nothing_only_tests_use():
    """Test doubles, test-only hooks and helpers live in tests/ (a seam the runtime itself honours, such as an
    injectable clock, is a parameter of the runtime code, not a name of its own)."""
    found = names_only_tests_use(PACKAGE, REPO / "tests", [REPO / p for p in USER_PATHS])
    assert found == [], f"used only by tests/, move them there: {found}"


def test_the_boundary_check_fires(tmp_path):
    package, tests, docs = tmp_path / "sgt_jax", tmp_path / "tests", tmp_path / "README.md"
    package.mkdir()
    tests.mkdir()
    (package / "runtime.py").write_text(
        "LIMIT = 3\nPROBE_ENV = 'X'\n\n\ndef step(n):\n    return step(n - 1) if n > LIMIT else n\n\n\n"
        "class Guard:\n    def stop(self):\n        return self.requested()\n\n    def requested(self):\n"
        "        return False\n\n    def probe(self):\n        return True\n\n\ndef documented():\n    pass\n")
    (package / "user.py").write_text("from sgt_jax.runtime import Guard\n\nGuard().stop()\n")
    (tests / "test_runtime.py").write_text(
        "from sgt_jax.runtime import PROBE_ENV, Guard, documented, step\n\n\ndef test():\n"
        "    assert step(9) and Guard().probe() and Guard().requested() is False and PROBE_ENV and documented\n")
    docs.write_text("Call `documented()`.\n")
    assert names_only_tests_use(package, tests, [docs]) == [
        "sgt_jax/runtime.py:2 PROBE_ENV", "sgt_jax/runtime.py:5 step", "sgt_jax/runtime.py:16 Guard.probe"]


# The package's one Flax NNX style: modules are split into (graphdef, state) outside a jitted pure function and
# merged inside it, as the sharded train step must; NNX's lifted transforms and stateful optimizer are not used.
LIFTED = ("jit", "Optimizer", "grad", "value_and_grad", "cached_partial", "shard_map", "pmap", "remat")


def lifted_transforms(package: Path) -> list[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in LIFTED and isinstance(node.value, ast.Name)
                    and node.value.id == "nnx"):
                found.append(f"{path.relative_to(package.parent)}:{node.lineno} nnx.{node.attr}")
    return found


def test_one_nnx_style(tmp_path):
    assert lifted_transforms(PACKAGE) == []
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("from flax import nnx\n\n\n@nnx.jit\ndef f(m):\n    return m\n")
    assert lifted_transforms(tmp_path / "pkg") == ["pkg/m.py:4 nnx.jit"]


def test_only_train_and_export_parse_their_own_flags():
    """evaluate, attack, bench and the sweep read their settings from the schema's command sections
    (sgt_jax.config.commands); argparse is left to train (its --config/--compile-only flags around the run's
    key=value overrides) and the export (two paths)."""
    users = sorted(str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
                   if any(isinstance(n, ast.Import) and any(a.name == "argparse" for a in n.names)
                          for n in ast.walk(ast.parse(p.read_text()))))
    assert users == ["sgt_jax/export/torch_export.py", "sgt_jax/train.py"]
