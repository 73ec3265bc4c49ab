"""Every relative link in the repository's markdown files resolves to a file inside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
EXTERNAL = re.compile(r"^([a-z][a-z0-9+.-]*:|#)", re.IGNORECASE)


def markdown_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "*.md"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: cannot list the repository's markdown files")
    return [REPO / name for name in out]


def relative_links(text: str) -> list[str]:
    """Link targets outside code spans and fences that are not URLs or in-page anchors."""
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [t for t in LINK.findall(text) if not EXTERNAL.match(t)]


def test_link_parser():
    assert relative_links("[a](docs/x.md#y) ![i](img.png) [u](https://e.org) [h](#top) "
                          "`[c](no.md)`") == ["docs/x.md#y", "img.png"]


def test_every_relative_markdown_link_resolves_inside_the_repository():
    files = markdown_files()
    assert any(f.name == "README.md" for f in files)
    bad = []
    for md in files:
        for target in relative_links(md.read_text(encoding="utf-8")):
            path = (md.parent / target.split("#", 1)[0]).resolve()
            if not path.exists() or REPO not in (path, *path.parents):
                bad.append(f"{md.relative_to(REPO)}: {target}")
    assert not bad, "links that do not resolve inside the repository: " + ", ".join(bad)
