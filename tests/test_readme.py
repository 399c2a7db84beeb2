"""The README stays true: every ddsmon command in it parses with the real CLI, every
script and file it names exists, and its two set-up commands are the ones .ci/run runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from ddsmon.cli import main

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def _commands(prefix: str) -> list[list[str]]:
    found = []
    for block in _bash_blocks(README):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith(prefix):
                found.append(shlex.split(line))
    return found


@pytest.mark.parametrize("argv", _commands("ddsmon "), ids=lambda a: " ".join(a[:2]))
def test_every_ddsmon_command_in_the_readme_parses(argv: list[str]) -> None:
    sub = main.commands[argv[1]]
    try:
        sub.make_context(argv[1], argv[2:], resilient_parsing=False)
    except click.BadParameter as exc:
        # paths in examples need not exist here; anything else is a real mismatch
        assert "does not exist" in str(exc), exc
    except click.UsageError as exc:  # pragma: no cover - shown on failure
        pytest.fail(f"README command {' '.join(argv)!r} does not parse: {exc}")


def test_every_option_in_the_reference_tables_exists() -> None:
    options = {opt for cmd in main.commands.values() for p in cmd.params for opt in p.opts}
    documented = set(re.findall(r"^\| `(--[a-z-]+)", README, flags=re.M))
    assert documented, "the CLI reference tables are missing"
    assert documented <= options, f"documented but not in the CLI: {documented - options}"
    internal = {"--help", "--version", "--verbose", "--json", "--spectra", "--fail-on-event"}
    undocumented = {o for o in options if o.startswith("--")} - documented - internal
    assert not undocumented, f"CLI options missing from the README: {undocumented}"


def test_files_and_scripts_the_readme_names_exist() -> None:
    for link in re.findall(r"\]\(((?:examples|docs|docker|benchmarks)[^)#]*)\)", README):
        assert (REPO / link).exists(), link
    for argv in _commands("python "):
        scripts = [a for a in argv if a.endswith(".py")]
        for script in scripts:
            assert (REPO / script).exists(), script
    assert (REPO / "BENCHMARKS.md").exists()


def test_ci_runs_the_readme_commands() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert "<!-- install-command -->" in ci and "<!-- test-command -->" in ci
    for marker in ("install-command", "test-command"):
        section = README.split(f"<!-- {marker} -->")[1].split(f"<!-- /{marker} -->")[0]
        assert len(_bash_blocks(section)) == 1, marker
