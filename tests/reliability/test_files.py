"""Files get the user's umask; an output that is an input is refused; FIFOs are refused."""

from __future__ import annotations

import os
import stat

import pytest

from moesim import safeio
from moesim.errors import MoesimError
from moesim.results import atomic_write_bytes
from moesim.traces import save_trace, synthesize
from moesim.traces.synth import SynthConfig

from .helpers import cli

SMALL = SynthConfig(num_layers=2, num_ranks=2, num_experts=4, top_k=2, tokens_per_rank=16,
                    micro_batches_per_iteration=1, num_iterations=2)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_follow_the_umask_not_mkstemp(tmp_path, umask_022):
    atomic_write_bytes(tmp_path / "a.json", b"{}")
    assert _mode(tmp_path / "a.json") == 0o644
    os.umask(0o002)
    atomic_write_bytes(tmp_path / "b.json", b"{}")
    assert _mode(tmp_path / "b.json") == 0o664


def test_run_directory_files_are_readable_by_the_group(tmp_path, umask_022, capsys):
    assert cli("simulate", "--out", tmp_path / "r", "--iterations", "0:2", "--quiet",
               capsys=capsys)[0] == 0
    files = [p for p in (tmp_path / "r").rglob("*") if p.is_file()]
    assert files and all(_mode(p) == 0o644 for p in files)


def test_trace_files_and_directories_follow_the_umask(tmp_path, umask_022):
    os.umask(0o007)
    trace = synthesize(SMALL, rng=0)
    save_trace(trace, tmp_path / "t.npz")
    save_trace(trace, tmp_path / "tdir")
    assert _mode(tmp_path / "t.npz") == 0o660
    assert _mode(tmp_path / "tdir") == 0o770
    assert {_mode(p) for p in (tmp_path / "tdir").iterdir()} == {0o660}


@pytest.fixture
def trace_npz(tmp_path):
    return save_trace(synthesize(SMALL, rng=0), tmp_path / "t.npz")


@pytest.mark.parametrize("argv", [
    ("trace", "export", "{t}", "-o", "{t}"),
    ("trace", "spread", "{t}", "--ranks", "2", "-o", "{t}"),
    ("trace", "import", "csv", "{t}", "-o", "{t}"),
    ("simulate", "--trace", "{t}", "--out", "{t}"),
])
def test_an_output_equal_to_an_input_is_refused_and_the_input_survives(trace_npz, argv,
                                                                        capsys):
    before = trace_npz.read_bytes()
    code, err = cli(*[a.format(t=trace_npz) for a in argv], capsys=capsys)
    assert code == 2 and "would destroy that input" in err and err.count("\n") == 1
    assert trace_npz.read_bytes() == before


def test_an_output_inside_an_input_directory_is_refused_through_a_symlink(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli("simulate", "--out", run, "--iterations", "0:2", "--quiet")[0] == 0
    manifest = (run / "manifest.json").read_bytes()
    (tmp_path / "link").symlink_to(run)
    capsys.readouterr()
    code, err = cli("report", run, "-o", tmp_path / "link" / "manifest.json", capsys=capsys)
    assert code == 2 and "would destroy that input" in err
    code, err = cli("plot", "step_time", run, "-o", run / "x.png", capsys=capsys)
    assert code == 2 and "lies inside the input" in err
    assert (run / "manifest.json").read_bytes() == manifest


def test_a_fifo_given_as_a_trace_is_refused_at_once(tmp_path, capsys):
    fifo = tmp_path / "fifo.npz"
    os.mkfifo(fifo)
    for argv in (("trace", "info", fifo), ("simulate", "--trace", fifo, "--out", tmp_path / "o"),
                 ("trace", "import", "csv", fifo, "-o", tmp_path / "x.npz")):
        code, err = cli(*argv, capsys=capsys)
        assert code == 2 and "is a FIFO" in err
    with pytest.raises(MoesimError, match="a device"):
        safeio.check_input_kind("/dev/null")


@pytest.mark.parametrize("name, fragment", [
    ("x" * 300 + ".csv", "File name too long"),
    ("ro/t.csv", "Permission denied"),
])
def test_os_errors_name_the_output_the_user_asked_for(tmp_path, trace_npz, name, fragment,
                                                      capsys):
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o500)
    try:
        out = tmp_path / name
        code, err = cli("trace", "export", trace_npz, "-o", out, capsys=capsys)
    finally:
        os.chmod(tmp_path / "ro", 0o700)
    if fragment == "Permission denied" and os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    assert code == 2 and fragment in err and str(out) in err and ".tmp" not in err
    assert err.count("\n") == 1


def test_writing_over_a_directory_names_it(tmp_path, capsys):
    (tmp_path / "d.png").mkdir()
    assert cli("simulate", "--out", tmp_path / "r", "--iterations", "0:2", "--quiet")[0] == 0
    code, err = cli("plot", "step_time", tmp_path / "r", "-o", tmp_path / "d.png",
                    capsys=capsys)
    assert code == 2 and "d.png" in err and ".tmp" not in err
