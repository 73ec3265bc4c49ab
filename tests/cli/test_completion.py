"""``moesim completion``: a script for each shell from the real parser (needs shtab)."""

from __future__ import annotations

import pytest

from moesim.cli import main


def test_completion_scripts(capsys):
    pytest.importorskip("shtab", reason="shtab (the completion extra) is not installed")
    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    for word in ("simulate", "policies", "--max-drop-frac", "--knob", "--policy"):
        assert word in script
    assert main(["completion", "zsh"]) == 0
    assert "#compdef moesim" in capsys.readouterr().out


def test_completion_without_shtab_is_one_line(monkeypatch, capsys):
    import builtins

    real = builtins.__import__

    def no_shtab(name, *args, **kwargs):
        if name == "shtab":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_shtab)
    assert main(["completion", "bash"]) == 2
    assert "pip install shtab" in capsys.readouterr().err
