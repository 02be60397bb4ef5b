"""The README is the front door and docs/ holds the rest: links resolve, the README stays short, every command
has its page. Fast: no framework is imported (the command list comes from `python -m gradparity --help`)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 250

#: [text](target) and [text](target "title"); images too (the leading ! is not needed to match).
INLINE_LINK = re.compile(r"\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
#: [label]: target (reference definitions, at the start of a line).
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)


def markdown_files() -> list[Path]:
    return [README] + sorted(DOCS.rglob("*.md"))


def links(text: str) -> list[str]:
    """Every link target outside code (fenced blocks and code spans are not rendered as links)."""
    prose = CODE_SPAN.sub("", FENCE.sub("", text))
    return INLINE_LINK.findall(prose) + REFERENCE_LINK.findall(prose)


def is_relative(target: str) -> bool:
    return not (re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("#", "//")))


def test_the_docs_exist():
    assert DOCS.is_dir() and (DOCS / "index.md").is_file() and (DOCS / "commands").is_dir()


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file_that_exists(page):
    broken = []
    for target in links(page.read_text(encoding="utf-8")):
        if not is_relative(target):
            continue
        path = target.split("#", 1)[0].split("?", 1)[0]
        if not path:
            continue
        if not (page.parent / path).resolve().exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"


def test_the_link_checker_sees_links_and_skips_code():
    text = ("[a](docs/x.md) [b](../y.md#part) [c](https://example.org) [d](#here) `[e](no.md)`\n"
            "```\n[f](nope.md)\n```\n[ref]: z.md\n")
    assert links(text) == ["docs/x.md", "../y.md#part", "https://example.org", "#here", "z.md"]
    assert [t for t in links(text) if is_relative(t)] == ["docs/x.md", "../y.md#part", "z.md"]


def test_readme_is_the_front_door_at_most_250_lines():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move the detail into docs/"


def test_readme_keeps_the_two_commands_ci_runs():
    """.ci/run runs the first two README lines that start with `python3 -m venv`: set-up + run, set-up + tests."""
    commands = [line for line in README.read_text(encoding="utf-8").splitlines()
                if line.startswith("python3 -m venv ")]
    assert len(commands) == 2, commands
    assert "gradparity run" in commands[0] and "pytest" in commands[1]


def cli_commands() -> list[str]:
    """The commands `gradparity --help` lists ({run,doctor,...} in its usage)."""
    proc = subprocess.run([sys.executable, "-m", "gradparity", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    found = re.search(r"\{([a-z][a-z0-9,-]*)\}", proc.stdout)
    assert found, proc.stdout
    return found.group(1).split(",")


def test_every_command_has_a_page_in_docs_commands():
    commands = cli_commands()
    assert "run" in commands and "diagnose" in commands, commands
    missing = [c for c in commands if not (DOCS / "commands" / f"{c}.md").is_file()]
    assert not missing, f"commands without a page in docs/commands/: {missing}"
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    unlisted = [c for c in commands if f"commands/{c}.md" not in index]
    assert not unlisted, f"docs/index.md does not link the pages of: {unlisted}"
