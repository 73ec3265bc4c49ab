"""Every bad input is one line on stderr and exit code 2: bounded work, malformed files,
absurd values, damaged run directories, and one rule per quantity for simulate and search."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from moesim import bounds
from moesim.errors import MoesimError
from moesim.traces import save_trace, synthesize
from moesim.traces.synth import SynthConfig

from .helpers import cli

TINY = SynthConfig(num_layers=2, num_ranks=4, num_experts=8, top_k=2, tokens_per_rank=64,
                   micro_batches_per_iteration=1, num_iterations=3)
SIM = ("--model", "tiny-cpu", "--cluster", "cpu-gloo-4", "--quiet")
RUN = ("--trace", "{trace}", "--model", "tiny-cpu")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("inputs")
    f = {"trace": save_trace(synthesize(TINY, rng=0), d / "t.npz")}
    for name, ranks, iters in (("bigrank", [0, 10_000_000_000], [0]),
                               ("bigiter", [0], [0, 1, 10**12]),
                               ("duprank", [0, 1], [0])):
        folder = d / name
        folder.mkdir()
        for it in iters:
            for r in ranks:
                (folder / f"table_iter{it}_rank{r}.log").write_text("0:[[1,1,1,1]]\n")
        f[name] = folder
    (f["duprank"] / "table_iter0_rank01.log").write_text("0:[[1,1,1,1]]\n")
    sup = d / "superscript"
    sup.mkdir()
    (sup / "table_iter0_rank0.log").write_text("\u00b2:[[1,1,1,1]]\n")
    f["superscript"] = sup
    f["csv"] = d / "big.csv"
    f["csv"].write_text("pass,layer,rank,expert,count\n0,0,0,1999999999,5\n")
    f["npy"] = d / "huge.npy"
    header = b"{'descr': '<i8', 'fortran_order': False, 'shape': (1000000, 1000000), }"
    f["npy"].write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header)
    f["badnpy"] = d / "bad.npy"
    bad = b"{'descr': '<i8', 'fortran_order': False, 'shape': (3,'"
    f["badnpy"].write_bytes(b"\x93NUMPY\x01\x00" + len(bad).to_bytes(2, "little") + bad)
    f["deepjson"] = d / "deep.json"
    f["deepjson"].write_text('{"logical_count": ' + "[" * 100000 + "]" * 100000 + "}")
    f["deeptoml"] = d / "deep.toml"
    f["deeptoml"].write_text("[search]\nseeds = " + "[" * 100000 + "]" * 100000 + "\n")
    f["hugemodel"] = d / "m.toml"
    text = cli_text("presets", "models", "tiny-cpu")
    f["hugemodel"].write_text(text.replace("hidden_size = 64", "hidden_size = 1e30"))
    return f


def cli_text(*argv: str) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli(*argv)[0] == 0
    return buf.getvalue()


def one_line_error(capsys, *argv) -> str:
    code, err = cli(*argv, capsys=capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moesim: error: "), err
    return lines[0]


@pytest.mark.parametrize("argv, needle", [
    (("trace", "import", "smartmoe", "{bigrank}", "-o", "{tmp}/x.npz"), "no file has rank 1"),
    (("trace", "import", "smartmoe", "{bigiter}", "-o", "{tmp}/x.npz"), "missing"),
    (("trace", "import", "smartmoe", "{duprank}", "-o", "{tmp}/x.npz"), "same iteration 0 and"),
    (("trace", "import", "smartmoe", "{superscript}", "-o", "{tmp}/x.npz"), "is not 'layer:"),
    (("trace", "import", "csv", "{csv}", "-o", "{tmp}/x.npz"), "would need"),
    (("trace", "import", "eplb", "{npy}", "-o", "{tmp}/x.npz"), "claims shape (1000000"),
    (("trace", "import", "eplb", "{badnpy}", "-o", "{tmp}/x.npz"), "malformed header"),
    (("trace", "import", "sglang", "{deepjson}", "-o", "{tmp}/x.npz"), "not valid JSON"),
    (("search", "{deeptoml}", "-o", "{tmp}/s"), "cannot parse search spec"),
    (("trace", "synth", "--layers", "100000", "--experts", "100000", "-o", "{tmp}/x.npz"),
     "lower --layers"),
    (("simulate", "--trace", "{trace}", *SIM, "--out", "{tmp}/o", "--policy", "swiftmoe",
      "--knob", "slots_per_rank=100000000"), "lower slots_per_rank"),
    (("simulate", "--trace", "{trace}", *SIM, "--out", "{tmp}/o", "--policy", "fastermoe",
      "--knob", "max_shadow=100000000"), "lower max_shadow"),
    (("simulate", "--trace", "{trace}", *SIM, "--out", "{tmp}/o", "--knob",
      "capacity_factor=inf"), "finite"),
    (("simulate", "--trace", "{trace}", "--model", "{hugemodel}", "--cluster", "cpu-gloo-4",
      "--out", "{tmp}/o"), "too large to be real"),
    (("simulate", "--trace", "{trace}", *SIM, "--out", "{tmp}/o", "--seed", "-1"), ">= 0"),
    (("simulate", "--trace", "{trace}", *SIM, "--out", "{tmp}/o", "--iterations",
      "0:1000000"), "not truncated"),
    (("simulate", "--trace", "{trace}", *SIM, "--out", "{tmp}/o", "--timeline", "999"),
     "not among the iterations run"),
    (("trace", "import", "csv", "{csv}", "--micro-batches", "0", "-o", "{tmp}/x.npz"),
     "--micro-batches 0 must be >= 1"),
    (("trace", "info", "{trace}", "--ep-size", "0"), "--ep-size 0"),
    (("validate", "--world-sizes", "abc", "--out", "{tmp}/v"), "--world-sizes 'abc'"),
    (("run", *RUN, "--warmup", "-1", "--out", "{tmp}/r"), "--warmup -1"),
    (("run", *RUN, "--hang-timeout-s", "-1", "--out", "{tmp}/r"), "--hang-timeout-s"),
    (("calibrate", "--reps", "0", "--out", "{tmp}/c.toml"), "--repeats 0"),
    (("search", "--limit", "-1", "-o", "{tmp}/s"), "--limit -1"),
    (("search", "--top", "-1", "-o", "{tmp}/s"), "--top -1"),
    (("search", "--max-drop-frac", "5", "-o", "{tmp}/s"), "--max-drop-frac 5"),
    (("search", "--max-memory-GiB", "nan", "-o", "{tmp}/s"), "finite"),
    (("search", "--max-memory-GiB", "-1", "-o", "{tmp}/s"), "must be > 0"),
])
def test_bad_input_is_one_line(files, tmp_path, capsys, argv, needle):
    line = one_line_error(capsys, *[a.format(tmp=tmp_path, **files) for a in argv])
    assert needle in line
    assert not list((tmp_path / "o").glob("parts/part-*"))  # nothing finished


SPEC_HEAD = """[search]
traces = ["{trace}"]
models = ["tiny-cpu"]
clusters = ["{cluster}"]
"""


@pytest.mark.parametrize("extra, cluster, needle", [
    ('iterations = 0\n', "cpu-gloo-4", "selects nothing"),
    ('iterations = -5\n', "cpu-gloo-4", "selects nothing"),
    ('iterations = "5:2"\n', "cpu-gloo-4", "selects nothing"),
    ('iterations = "garbage"\n', "cpu-gloo-4", "not A:B"),
    ('seeds = [1.7]\n', "cpu-gloo-4", "must be an integer"),
    ('seeds = ["abc"]\n', "cpu-gloo-4", "is not an integer"),
    ('seeds = [-1]\n', "cpu-gloo-4", ">= 0"),
    ('', "cpu-gloo-4@0", "must be >= 1"),
    ('', "no-such-cluster", "no clusters preset"),
])
def test_search_refuses_a_bad_spec_up_front_like_simulate(files, tmp_path, capsys, extra,
                                                           cluster, needle):
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC_HEAD.format(trace=files["trace"], cluster=cluster) + extra
                    + "[policies.static_ep]\ncapacity_factor = [1.0]\n")
    assert needle in one_line_error(capsys, "search", spec, "-o", tmp_path / "s")
    assert not (tmp_path / "s" / "results.jsonl").exists()  # nothing ran


def test_search_refuses_an_unknown_knob_before_running_anything(files, tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC_HEAD.format(trace=files["trace"], cluster="cpu-gloo-4")
                    + "[policies.static_ep]\ncapacity_factor = [1.0]\n"
                    + "[policies.swiftmoe]\nno_such_knob = [1]\n")
    assert "no knob 'no_such_knob'" in one_line_error(capsys, "search", spec, "-o",
                                                      tmp_path / "s")


def test_simulate_and_search_share_the_iteration_rule():
    from moesim.analysis.simulate_adapter import iterations_arg
    from moesim.simulate_cli import parse_iterations

    for text in ("5:2", "-1:3", "x", "1:x"):
        with pytest.raises(MoesimError):
            parse_iterations(text)
        with pytest.raises(MoesimError):
            iterations_arg(text)
    assert parse_iterations("2:5") == iterations_arg("2:5") == (2, 5)


def test_npz_member_header_claiming_a_huge_shape_is_refused_before_allocating(tmp_path):
    path = tmp_path / "t.npz"
    header = b"{'descr': '<i8', 'fortran_order': False, 'shape': (1000000, 1000000), }"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("counts.npy", b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little")
                   + header + b"\0" * 64)
        z.writestr("meta_json.npy", b"")
    with pytest.raises(MoesimError, match="claims shape"):
        bounds.check_npz_members(path)
    from moesim.traces import load_trace

    with pytest.raises(MoesimError, match="claims shape"):
        load_trace(path)


def test_check_bytes_names_the_size_and_the_flag(monkeypatch):
    monkeypatch.setenv(bounds.MAX_ENV, str(2**20))
    with pytest.raises(MoesimError, match=r"8\.0 MiB .* lower --things"):
        bounds.check_shape((1024, 1024), "a table", "lower --things")
    bounds.check_shape((16, 16), "a table", "lower --things")


def test_metadata_with_absurd_integers_is_refused(tmp_path, capsys):
    trace = synthesize(TINY, rng=0)
    for field, value in (("tokens_per_rank", 10**30), ("iteration_stride", 10**30)):
        d = save_trace(trace, tmp_path / f"d-{field}")
        meta = json.loads((d / "meta.json").read_text())
        meta[field] = value
        (d / "meta.json").write_text(json.dumps(meta))
        assert "too large to be real" in one_line_error(capsys, "trace", "info", d)


def test_eplb_counts_whose_sum_overflows_int64_are_refused(tmp_path, capsys):
    np.save(tmp_path / "w.npy", np.full((2, 4), 2**61, dtype=np.int64))
    assert "overflow" in one_line_error(capsys, "trace", "import", "eplb", tmp_path / "w.npy",
                                        "-o", tmp_path / "x.npz")


def test_sglang_bfloat16_and_sparse_dumps_are_accepted(tmp_path):
    torch = pytest.importorskip("torch")
    from moesim.traces.importers import import_sglang

    counts = torch.randint(0, 50, (3, 2, 4))
    for name, value in (("bf16", counts.to(torch.bfloat16)), ("sparse", counts.to_sparse())):
        torch.save({"logical_count": value}, tmp_path / f"{name}.pt")
        trace = import_sglang(tmp_path / f"{name}.pt")
        assert int(trace.counts_TLRE.sum()) == int(counts.sum())


def test_absurd_peak_flops_is_an_error_not_inf_ms(tmp_path, capsys):
    from moesim.specs import PRESET_DIR

    hw = (PRESET_DIR / "hardware" / "cpu-gloo.toml").read_text()
    (tmp_path / "hw.toml").write_text("\n".join(
        "peak_flops = 1e-300" if ln.startswith("peak_flops") else ln for ln in hw.splitlines()))
    cluster = (PRESET_DIR / "clusters" / "cpu-gloo-4.toml").read_text()
    (tmp_path / "c.toml").write_text("\n".join(
        f'hardware = "{tmp_path / "hw.toml"}"' if ln.startswith("hardware") else ln
        for ln in cluster.splitlines()))
    trace = save_trace(synthesize(TINY, rng=0), tmp_path / "t.npz")
    line = one_line_error(capsys, "simulate", "--trace", trace, "--model", "tiny-cpu",
                          "--cluster", tmp_path / "c.toml", "--out", tmp_path / "o")
    assert "absurd" in line
