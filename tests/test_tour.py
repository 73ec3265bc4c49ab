"""README's five-minute tour, run as a new user would: every ``moesim`` command of the tour's
code blocks, in order, in a fresh directory, with its output checked against what README shows.

In a ```` ```text ```` block, ``$ CMD`` lines are commands and the lines after them the output
README promises: exact, except that a ``...`` line stands for any number of lines, and the
executor's lines (``moesim run``: measured times and float rounding) are compared with their
numbers masked. ```` ```bash ```` blocks' ``moesim`` lines must run and exit 0 (the Ray cluster
lines need a Ray cluster and are left out).

The tour starts from SmartMoE's published trace (GPL-3.0, not shipped; see docs/traces.md),
which README expects at ``../shared/data/smartmoe-trace``. The test looks for it beside the
repository (or in ``$MOESIM_SHARED``, the folder holding ``data/``) and skips, saying so,
without it.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from moesim.cli import main

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def tour_section(text: str) -> str:
    """README's tour: from its heading to the next ``## `` heading."""
    start = text.index("## A five-minute tour")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def tour_steps(section: str) -> list[tuple[str, list[str] | None]]:
    """``(command, expected output lines or None)`` for every moesim command, in order."""
    steps: list[tuple[str, list[str] | None]] = []
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", section, re.S):
        lines = body.rstrip("\n").split("\n")
        if lang == "text":
            for line in lines:
                if line.startswith("$ "):
                    steps.append((line[2:].strip(), []))
                elif steps and steps[-1][1] is not None:
                    steps[-1][1].append(line.rstrip())
        elif lang == "bash":
            for line in lines:
                cmd = line.split("  #")[0].strip()
                if cmd.startswith("moesim ") and "--ray" not in cmd:
                    steps.append((cmd, None))
    for _, expected in steps:
        while expected and not expected[-1]:
            expected.pop()
    return steps


def _segments(expected: list[str]) -> list[list[str]]:
    out, cur = [], []
    for line in expected:
        if line.strip() == "...":
            out.append(cur)
            cur = []
        else:
            cur.append(line)
    out.append(cur)
    return out


def matches(expected: list[str], actual: list[str]) -> str:
    """"" when ``actual`` is what ``expected`` shows (``...`` = any lines), else why not."""
    segs = _segments(expected)
    pos = 0
    for i, seg in enumerate(segs):
        if not seg:
            continue
        anchored = i == 0
        found = next((j for j in range(pos, len(actual) - len(seg) + 1)
                      if actual[j:j + len(seg)] == seg and (not anchored or j == 0)), None)
        if found is None:
            return f"README shows {seg[0]!r}... which the output lacks at line {pos}"
        pos = found + len(seg)
    if segs[-1] and pos != len(actual):
        return f"the output goes on after README's last line: {actual[pos]!r}"
    return ""


def _mask(lines: list[str]) -> list[str]:
    return [NUMBER.sub("#", line) for line in lines]


def _shared() -> Path | None:
    for base in (os.environ.get("MOESIM_SHARED"), REPO.parent / "shared"):
        if base and (Path(base) / "data" / "smartmoe-trace").is_dir():
            return Path(base)
    return None


def test_tour_parses():
    steps = tour_steps(tour_section(README.read_text()))
    commands = [c for c, _ in steps]
    assert commands[0].startswith("moesim trace import smartmoe")
    assert any(c.startswith("moesim report") for c in commands)
    assert any(c.startswith("moesim trace synth") and "tiny4.npz" in c for c in commands)
    tiny = next(i for i, c in enumerate(commands) if "-o tiny4.npz" in c)
    assert tiny < next(i for i, c in enumerate(commands) if c.startswith("moesim run"))
    assert matches(["a", "...", "c"], ["a", "b", "c"]) == ""
    assert matches(["a", "c"], ["a", "b", "c"]) != ""


@pytest.mark.slow
def test_readme_tour_runs_as_shown(tmp_path, monkeypatch, capfd):
    shared = _shared()
    if shared is None:
        pytest.skip("the tour starts from SmartMoE's trace (GPL-3.0, not shipped): put "
                    "shared/data/smartmoe-trace beside the repository or set MOESIM_SHARED")
    (tmp_path / "shared").symlink_to(shared)
    work = tmp_path / "w"
    work.mkdir()
    monkeypatch.chdir(work)
    for command, expected in tour_steps(tour_section(README.read_text())):
        argv = shlex.split(command)
        rc = main(argv[1:])
        out, err = capfd.readouterr()
        assert rc == 0, f"{command}: exit {rc}: {err[-1500:]}"
        if not expected:
            continue
        actual = (out + err).rstrip("\n").split("\n")
        actual = [line.rstrip() for line in actual]
        if argv[1] == "run":  # measured: compare the words, not the numbers
            why = matches(_mask(expected), _mask(actual))
        else:
            why = matches(expected, actual)
        assert not why, f"{command}: {why}\n--- output ---\n" + "\n".join(actual[:40])
