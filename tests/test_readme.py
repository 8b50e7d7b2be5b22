"""The README's five-minute tour only uses what the install it names provides: every ``python -m`` module exists,
and every other program comes from a requirement of an extra that the README installs."""

import configparser
import importlib.util
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tour_commands() -> list[list[str]]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## A five-minute tour", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [words for line in block.splitlines() if (words := shlex.split(line, comments=True))]


def _extras() -> dict[str, set[str]]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ROOT / "setup.cfg")
    return {name: {re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower() for req in value.split("\n") if req.strip()}
            for name, value in parser["options.extras_require"].items()}


def _installed_extras(readme: str) -> set[str]:
    """Extras of every ``pip install -e ".[a,b]"`` in the README."""
    return {extra.strip() for group in re.findall(r'pip install -e "\.\[([^\]]*)\]"', readme) for extra in group.split(",")}


def test_every_tour_command_is_provided_by_the_readme_install():
    extras = _extras()
    readme = (ROOT / "README.md").read_text()
    provided = set().union(*(extras[name] for name in _installed_extras(readme)))
    commands = _tour_commands()
    assert len(commands) >= 4
    for words in commands:
        if words[:2] == ["python", "-m"]:
            assert importlib.util.find_spec(words[2]) is not None, words
        elif words[:2] == ["pip", "install"]:
            continue
        else:
            # A console script (tensorboard) that the base install does not bring: an extra the README installs must.
            assert words[0].lower() in provided, (
                f"the tour runs {words[0]!r}, which no extra installed by the README provides: "
                f"add it to an extra in setup.cfg and name that extra in the README")
