"""``moesim trace record`` (via ``add_record_parser`` / ``record_cli.main``)."""

import argparse

import pytest

from moesim.traces.io import load_trace
from moesim.traces.record_cli import add_record_parser, main, run_record

TINY = ["--ranks", "2", "--tokens", "64", "--seq-len", "32", "--layers", "1", "--d-model", "16",
        "--ffn-hidden", "16", "--experts", "4"]


def test_parser_plugs_into_trace_subcommands():
    parser = argparse.ArgumentParser(prog="moesim trace")
    add_record_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["record", "--train", "-o", "x.npz"])
    assert args.func is run_record and args.train and args.steps == 300


def test_train_records_its_exact_command(tmp_path, capsys):
    out = tmp_path / "t.npz"
    assert main(["--train", "--steps", "2", *TINY, "-o", str(out)]) == 0
    trace = load_trace(out)
    assert trace.counts_TLRE.shape == (2, 1, 2, 4)
    cmd = trace.meta.extra["command"]
    assert cmd.startswith("moesim trace record --train --corpus stdlib --steps 2")
    assert "wrote" in capsys.readouterr().out


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    rc = main(["--train", "--corpus", str(tmp_path / "nope.txt"), *TINY, "-o",
               str(tmp_path / "t.npz")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("moesim: error:") and "\n" not in err
    assert main(["--train", "--tokens", "100", "-o", str(tmp_path / "t.npz")]) == 2


def test_hf_model_with_text(tmp_path):
    pytest.importorskip("transformers", reason="needs transformers (pip install 'moesim[hf]')")
    text = tmp_path / "a.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 40)
    out = tmp_path / "hf.npz"
    assert main(["--hf-model", "tiny-qwen3-moe", "--text", str(text), "--ranks", "2",
                 "--tokens", "64", "--seq-len", "32", "-o", str(out)]) == 0
    trace = load_trace(out)
    assert trace.meta.num_ranks == 2 and trace.topk_TLRNK is not None
    assert trace.meta.extra["input"].startswith("text")
