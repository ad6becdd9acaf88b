"""The user documentation keeps up with the product: the README stays short, every verb, recipe and config
section is documented, every link resolves, and no text speaks of the project's issue tracker."""
from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path

import pytest

from vidpo.cli import build_parser
from vidpo.config import RunConfig

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
MAX_README_LINES = 250


def _documentation() -> str:
    return "\n".join(path.read_text() for path in [README, *DOCS])


def _verbs() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    return sorted(sub.choices)


def test_readme_is_a_short_page_for_users():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines: move detail into docs/"
    assert "docs/ARCHITECTURE.md" in README.read_text()


@pytest.mark.parametrize("verb", _verbs())
def test_every_cli_verb_is_documented(verb):
    assert f"vidpo {verb}" in _documentation(), f"`vidpo {verb}` appears neither in README.md nor in docs/"


@pytest.mark.parametrize("recipe", sorted(p.relative_to(REPO).as_posix() for p in (REPO / "recipes").rglob("*.yaml")))
def test_every_recipe_is_documented(recipe):
    assert recipe in _documentation(), f"{recipe} appears neither in README.md nor in docs/"


@pytest.mark.parametrize("section", [f.name for f in dataclasses.fields(RunConfig)])
def test_every_config_section_is_documented(section):
    text = _documentation()
    assert re.search(rf"`{section}[`.:]", text), f"config section '{section}' is documented nowhere"


def test_every_relative_link_resolves():
    broken = []
    for path in [README, *DOCS, *sorted((REPO / "benchmarks" / "reports").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (path.parent / target).exists():
                broken.append(f"{path.relative_to(REPO)} -> {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_no_text_speaks_of_the_issue_tracker():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"\b(issues? \d+|acceptance points?|session \d+)\b", re.IGNORECASE)
    offenders = []
    for name in tracked:
        path = REPO / name
        if path.suffix not in {".py", ".md", ".yaml", ".sh", ".tmpl", ".toml", ".cpp", ".cu", ".h"} \
                or name == "tests/test_docs.py" or not path.exists():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{name}:{number}: {line.strip()[:100]}")
    assert not offenders, "\n".join(offenders)
