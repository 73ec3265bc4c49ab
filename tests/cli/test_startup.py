"""Start-up guard: building the ``moesim`` parser and importing the non-executor commands must
not import torch (torch costs seconds; only the executor and recorder paths need it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
import moesim.cli
assert "torch" not in sys.modules, "importing moesim.cli imported torch"
moesim.cli.build_parser()
assert "torch" not in sys.modules, "building the parser imported torch"
{extra}
assert "torch" not in sys.modules, "running the command imported torch"
print("ok")
"""


def _probe(extra: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE.format(extra=extra)],
                          capture_output=True, text=True, timeout=120)


def test_cli_import_and_parser_do_not_import_torch():
    proc = _probe()
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.parametrize("argv", [["--version"], ["presets"], ["policies"], ["trace", "info"]])
def test_light_commands_do_not_import_torch(argv):
    call = (f"try:\n    moesim.cli.main({argv!r})\nexcept SystemExit:\n    pass\n"
            "import io")
    proc = _probe(call)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
