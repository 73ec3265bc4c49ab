"""Property-based fuzzing: every loader, importer and command-line parser either succeeds or
raises a one-line MoesimError; nothing else escapes (no traceback, no hang, no huge
allocation). Bounded: each property runs a fixed, derandomized number of examples, so the
whole file adds well under a minute to the suite on 2 cores."""

from __future__ import annotations

import io
import json
import shlex
import tempfile
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz suite needs hypothesis "
                                 "(pip install -e .[dev])")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from moesim.errors import MoesimError  # noqa: E402
from moesim.traces import save_trace, synthesize  # noqa: E402
from moesim.traces.synth import SynthConfig  # noqa: E402

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
SMALL = SynthConfig(num_layers=2, num_ranks=2, num_experts=4, top_k=2, tokens_per_rank=8,
                    micro_batches_per_iteration=1, num_iterations=2)


def _valid_npz() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        return save_trace(synthesize(SMALL, rng=0), Path(d) / "t.npz").read_bytes()


VALID_NPZ = _valid_npz()
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70)
                    | st.floats(allow_nan=True) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def survives(fn, *args, **kwargs) -> None:
    """``fn`` returns or raises MoesimError; any other exception fails the property."""
    try:
        fn(*args, **kwargs)
    except MoesimError as exc:
        assert "\n" not in str(exc).strip(), f"multi-line error: {exc}"


def _mutate(data: bytes, cuts: list[tuple[int, int]], truncate: int | None) -> bytes:
    buf = bytearray(data)
    for pos, val in cuts:
        if buf:
            buf[pos % len(buf)] = val
    return bytes(buf[:truncate] if truncate is not None else buf)


MUTATIONS = st.tuples(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                               max_size=6), st.one_of(st.none(), st.integers(0, 2000)))


@FUZZ
@given(MUTATIONS)
def test_load_trace_survives_damaged_npz(mutation):
    from moesim.traces import load_trace

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.npz"
        path.write_bytes(_mutate(VALID_NPZ, *mutation))
        survives(load_trace, path)


@FUZZ
@given(JSON, MUTATIONS)
def test_load_trace_survives_damaged_trace_directories(meta, mutation):
    from moesim.traces import load_trace

    with tempfile.TemporaryDirectory() as d:
        tdir = save_trace(synthesize(SMALL, rng=0), Path(d) / "tdir")
        good = json.loads((tdir / "meta.json").read_text())
        if isinstance(meta, dict):
            good.update(meta)
        (tdir / "meta.json").write_text(json.dumps(good if isinstance(meta, dict) else meta))
        counts = tdir / "counts.npy"
        counts.write_bytes(_mutate(counts.read_bytes(), *mutation))
        survives(load_trace, tdir)


ROW = st.lists(st.one_of(st.integers(-3, 2**40), st.floats(), st.text(max_size=4)),
               min_size=0, max_size=6)


@FUZZ
@given(st.lists(ROW, max_size=6), st.integers(0, 4), st.integers(0, 3))
def test_import_csv_survives_any_rows(rows, top_k, micro_batches):
    from moesim.traces.importers import import_csv

    text = "pass,layer,rank,expert,count\n" + "\n".join(",".join(map(str, r)) for r in rows)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.csv"
        path.write_text(text)
        survives(import_csv, path, top_k, micro_batches=max(micro_batches, 1))


HEADS = st.one_of(st.sampled_from(["0", "1", "\u00b2", "\u0663", " 0", "", "-1"]),
                  st.text(alphabet="0123456789\u00b2\u0663 -x", max_size=3))
BODIES = st.one_of(st.sampled_from(["1,1,1,1", "1,1],[1,1", "0.5,1", "nan,1", "1e300,1",
                                    "-1,2", "3,1,1,1"]),
                   st.text(alphabet="0123456789.,[] e-+naif", max_size=30))


@FUZZ
@given(st.lists(st.tuples(HEADS, BODIES), min_size=0, max_size=3),
       st.lists(st.tuples(st.sampled_from([0, 1, 10, 10**12]),
                          st.sampled_from(["0", "1", "01", "2", "10000000000"]),
                          st.lists(st.tuples(HEADS, BODIES), min_size=0, max_size=3)),
                max_size=3))
def test_import_smartmoe_survives_any_folder(first, files):
    from moesim.traces.importers import import_smartmoe

    with tempfile.TemporaryDirectory() as d:
        for it, rank, lines in [(0, "0", first), *files]:
            text = "\n".join(f"{head}:[[{body}]]" for head, body in lines)
            (Path(d) / f"table_iter{it}_rank{rank}.log").write_text(text)
        survives(import_smartmoe, d)


SHAPES = st.one_of(st.lists(st.integers(0, 10**7), max_size=4).map(lambda v: repr(tuple(v))),
                   st.text(alphabet="()0123456789,' ", max_size=12))


def _npy(descr: str, shape: str, cut: int | None, payload: int) -> bytes:
    header = f"{{'descr': {descr}, 'fortran_order': False, 'shape': {shape}, }}".encode()
    header = header[:cut] if cut is not None else header
    return (b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header
            + b"\x01" * payload)


NPY = st.builds(_npy, st.sampled_from(["'<i8'", "'<f4'", "'|O'", "'<U3'", "'x'", "3"]),
                SHAPES, st.one_of(st.none(), st.integers(0, 60)), st.integers(0, 256))


@FUZZ
@given(NPY)
def test_npy_headers_never_crash_or_allocate_what_they_claim(blob):
    import zipfile

    from moesim.traces import load_trace
    from moesim.traces.importers import import_eplb

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "w.npy").write_bytes(blob)
        survives(import_eplb, Path(d) / "w.npy")
        tdir = save_trace(synthesize(SMALL, rng=0), Path(d) / "tdir")
        (tdir / "counts.npy").write_bytes(blob)
        survives(load_trace, tdir)
        with zipfile.ZipFile(Path(d) / "t.npz", "w") as z:  # stored: the header is visible
            z.writestr("counts.npy", blob)
            z.writestr("meta_json.npy", (tdir / "meta.json").read_bytes())
        survives(load_trace, Path(d) / "t.npz")


@FUZZ
@given(st.text(max_size=80), MUTATIONS)
def test_import_eplb_survives_any_csv_or_npy(text, mutation):
    from moesim.traces.importers import import_eplb

    buf = io.BytesIO()
    np.save(buf, np.arange(8, dtype=np.int64).reshape(2, 4))
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "w.csv").write_text(text)
        survives(import_eplb, Path(d) / "w.csv")
        (Path(d) / "w.npy").write_bytes(_mutate(buf.getvalue(), *mutation))
        survives(import_eplb, Path(d) / "w.npy")


@FUZZ
@given(JSON)
def test_json_importers_survive_any_document(doc):
    from moesim.traces.import_vllm import import_vllm
    from moesim.traces.importers import import_sglang

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "dump.json"
        for wrapped in (doc, {"logical_count": doc}, {"load_history": doc}):
            path.write_text(json.dumps(wrapped))
            survives(import_sglang, path)
            survives(import_vllm, path)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10**11), st.lists(JSON, max_size=3)), min_size=1,
                max_size=3))
def test_import_megatron_survives_any_jsonl(files):
    from moesim.traces.import_megatron import import_megatron

    with tempfile.TemporaryDirectory() as d:
        for rank, records in files:
            (Path(d) / f"router_trace_rank{rank}.jsonl").write_text(
                "\n".join(json.dumps(r) for r in records))
        survives(import_megatron, d)


@FUZZ
@given(JSON)
def test_import_trtllm_survives_any_meta(doc):
    from moesim.traces.import_trtllm import import_trtllm

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "meta_info.json").write_text(json.dumps(doc))
        survives(import_trtllm, d)


TOML_VALUES = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                        st.text(max_size=8), st.booleans(),
                        st.lists(st.integers(-5, 10), max_size=3))


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v).replace("inf", "inf")
    if isinstance(v, str):
        return json.dumps(v)
    return json.dumps(v) if isinstance(v, list) else str(v)


@FUZZ
@given(st.dictionaries(st.sampled_from(["traces", "models", "clusters", "iterations", "seeds",
                                        "bogus"]), TOML_VALUES, max_size=4),
       st.dictionaries(st.sampled_from(["capacity_factor", "slots_per_rank", "max_shadow",
                                        "nope"]), TOML_VALUES, max_size=3),
       st.sampled_from(["static_ep", "swiftmoe", "fastermoe", "no_such"]))
def test_search_spec_checks_survive_any_grid(search, knobs, policy):
    from moesim.analysis.search_check import check_configs
    from moesim.analysis.search_spec import load_spec

    text = "[search]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in search.items())
    text += f"[policies.{policy}]\n" + "".join(f"{k} = {_toml_value(v)}\n"
                                               for k, v in knobs.items())
    with tempfile.TemporaryDirectory() as d:
        spec = Path(d) / "spec.toml"
        spec.write_text(text)
        survives(lambda: check_configs(load_spec(spec), spec))


@FUZZ
@given(st.dictionaries(st.sampled_from(["num_layers", "hidden_size", "ffn_hidden_size",
                                        "num_experts", "top_k", "seq_len", "bytes_weight",
                                        "name"]), TOML_VALUES, max_size=4))
def test_model_files_survive_any_values(fields):
    from moesim.specs import PRESET_DIR, load_model

    base = (PRESET_DIR / "models" / "tiny-cpu.toml").read_text().splitlines()
    lines = [ln for ln in base if ln.split("=")[0].strip() not in fields]
    lines = [f"{k} = {_toml_value(v)}" for k, v in fields.items()] + lines
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.toml"
        path.write_text("\n".join(lines) + "\n")
        survives(load_model, path)


WORDS = st.sampled_from([
    "trace", "info", "import", "synth", "export", "validate", "spread", "simulate", "search",
    "plot", "report", "run", "calibrate", "presets", "csv", "smartmoe", "eplb", "all",
    "--seed", "--iterations", "--timeline", "--knob", "--nodes", "--world-size", "--top",
    "--limit", "--max-drop-frac", "--max-memory-GiB", "--micro-batches", "--ep-size",
    "--layers", "--experts", "--warmup", "--hang-timeout-s", "--reps", "--skew", "-o",
    "--out", "--trace", "--policy", "--model", "--cluster", "--resume", "--top-k",
    "-1", "0", "1", "3", "1e30", "nan", "inf", "-inf", "5:2", "0:", ":3", "abc", "x=y", "=",
    "capacity_factor=inf", "slots_per_rank=100000000", "static_ep", "out.npz", "out.png",
    "/dev/null", ".", "\u00b2", "",
])


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.lists(WORDS, max_size=8))
def test_argument_parsing_and_checks_survive_any_command_line(words):
    import contextlib

    from moesim.cli import build_parser
    from moesim.safeio import guard_arguments
    from moesim.simulate_cli import parse_iterations, parse_knobs, parse_timeline
    from moesim.validation import check_flags, flag_names

    parser = build_parser()
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            args = parser.parse_args(words)
    except SystemExit as exc:
        assert exc.code in (0, 2), shlex.join(words)  # argparse's usage error or --help
        return
    survives(guard_arguments, args)
    survives(check_flags, args, flag_names(parser))
    for value in words:
        survives(parse_iterations, value)
        survives(parse_timeline, value)
        survives(parse_knobs, [value])


@FUZZ
@given(st.text(max_size=20), st.dictionaries(st.sampled_from(
    ["capacity_factor", "slots_per_rank", "max_shadow", "window", "interval", "bogus"]),
    st.one_of(st.text(max_size=6), st.integers(-5, 10**9), st.floats()), max_size=3),
    st.sampled_from(["static_ep", "swiftmoe", "fastermoe", "eplb", "flexmoe", "smartmoe"]))
def test_cluster_names_and_policy_knobs_survive_anything(cluster, knobs, policy):
    from moesim.analysis.simulate_adapter import load_cluster_arg
    from moesim.policies import make_policy
    from moesim.validation import plan_size

    survives(load_cluster_arg, "cpu-gloo-4@" + cluster)

    def build():
        plan_size(make_policy(policy, knobs), 24, 16, 32)

    survives(build)
