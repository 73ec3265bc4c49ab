"""Property tests: whatever bytes or arrays a file holds, loaders and importers either return a
valid trace or raise a clean TraceError/MoesimError — never another exception."""

from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from moesim.errors import MoesimError
from moesim.traces import (
    import_csv,
    import_eplb,
    import_sglang,
    import_smartmoe,
    load_trace,
    save_trace,
    validate,
)
from moesim.traces.format import RoutingTrace, TraceMeta

# MOESIM_HYPOTHESIS_EXAMPLES=500 for a deeper search than the default quick run.
SETTINGS = settings(max_examples=int(os.environ.get("MOESIM_HYPOTHESIS_EXAMPLES", "40")),
                    deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

small_arrays = hnp.arrays(
    dtype=st.sampled_from([np.int64, np.int32, np.float64, np.uint8, np.bool_]),
    shape=hnp.array_shapes(min_dims=0, max_dims=5, max_side=4),
)


def clean(fn, *args, **kwargs):
    """Call ``fn``; a MoesimError is fine, any other exception fails the property."""
    try:
        result = fn(*args, **kwargs)
    except MoesimError:
        return None
    if isinstance(result, RoutingTrace):
        validate(result)
    return result


@SETTINGS
@given(data=st.binary(max_size=600))
def test_random_bytes_as_npz(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("b") / "t.npz"
    path.write_bytes(data)
    clean(load_trace, path)


@SETTINGS
@given(data=st.binary(max_size=300), prefix=st.sampled_from([b"", b"PK\x03\x04",
                                                            b"\x93NUMPY\x01\x00"]))
def test_random_bytes_in_trace_directory(tmp_path_factory, data, prefix):
    d = tmp_path_factory.mktemp("d")
    (d / "meta.json").write_bytes(prefix + data)
    (d / "counts.npy").write_bytes(prefix + data)
    clean(load_trace, d)


meta_dicts = st.fixed_dictionaries({
    "schema_version": st.sampled_from([1, 1, 1, 2, "1", None]),
    "num_layers": st.integers(-1, 3), "num_ranks": st.integers(-1, 3),
    "num_experts": st.integers(-1, 4), "top_k": st.integers(-1, 3),
    "tokens_per_rank": st.integers(-1, 6),
}, optional={"micro_batches_per_iteration": st.integers(0, 2), "variable_k": st.booleans(),
             "rank_resolved": st.one_of(st.booleans(), st.integers(0, 1)),
             "extra": st.one_of(st.dictionaries(st.text(max_size=3), st.integers()),
                                st.integers())})


@SETTINGS
@given(counts=small_arrays, meta=meta_dicts, topk=st.one_of(st.none(), small_arrays))
def test_random_arrays_in_npz(tmp_path_factory, counts, meta, topk):
    buf = io.BytesIO()
    arrays = {"counts": counts,
              "meta_json": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    if topk is not None:
        arrays["topk"] = topk
    np.savez(buf, **arrays)
    path = tmp_path_factory.mktemp("a") / "t.npz"
    path.write_bytes(buf.getvalue())
    trace = clean(load_trace, path)
    if trace is not None:  # a valid trace round-trips exactly
        save_trace(trace, path)
        np.testing.assert_array_equal(load_trace(path).counts_TLRE, trace.counts_TLRE)


@SETTINGS
@given(counts=small_arrays, layers=st.integers(0, 3), experts=st.integers(0, 5))
def test_random_arrays_in_memory(counts, layers, experts):
    meta = TraceMeta(num_layers=max(layers, 1), num_ranks=1, num_experts=max(experts, 1),
                     top_k=1, tokens_per_rank=4)
    clean(validate, RoutingTrace(counts, meta))


@SETTINGS
@given(data=st.binary(max_size=400))
def test_random_zip_members(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("z") / "t.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("counts.npy", b"\x93NUMPY\x01\x00" + data)
        z.writestr("meta_json.npy", data)
    clean(load_trace, path)


line_text = st.one_of(
    st.text(alphabet="0123456789[]:,. -nae", max_size=60),
    st.lists(st.lists(st.sampled_from(["1.0", "2.0", "0.5", "-1.0", "nan", "3"]), min_size=1,
                      max_size=3), min_size=1, max_size=3).map(
        lambda rows: "0:[" + ", ".join("[" + ", ".join(r) + "]" for r in rows) + "]"))


@SETTINGS
@given(files=st.dictionaries(st.tuples(st.integers(0, 3), st.integers(0, 2)),
                             st.lists(line_text, min_size=0, max_size=3), min_size=1,
                             max_size=4),
       top_k=st.integers(0, 3), uneven=st.booleans())
def test_random_smartmoe_folders(tmp_path_factory, files, top_k, uneven):
    d = tmp_path_factory.mktemp("s")
    for (it, rank), lines in files.items():
        (d / f"table_iter{it}_rank{rank}.log").write_text("\n".join(lines))
    clean(import_smartmoe, d, top_k, allow_uneven=uneven)


@SETTINGS
@given(text=st.one_of(st.text(alphabet="0123456789,-.x\n", max_size=80),
                      st.lists(st.lists(st.integers(-2, 5), min_size=5, max_size=5),
                               max_size=6).map(lambda rows: "\n".join(
                                   ",".join(map(str, r)) for r in rows))),
       top_k=st.integers(1, 3))
def test_random_csv(tmp_path_factory, text, top_k):
    path = tmp_path_factory.mktemp("c") / "t.csv"
    path.write_text("pass,layer,rank,expert,count\n" + text)
    clean(import_csv, path, top_k)


@SETTINGS
@given(weight=small_arrays, top_k=st.integers(1, 3))
def test_random_eplb_arrays(tmp_path_factory, weight, top_k):
    path = tmp_path_factory.mktemp("e") / "w.npy"
    np.save(path, weight)
    clean(import_eplb, path, top_k)


@SETTINGS
@given(value=st.recursive(st.one_of(st.integers(-3, 9), st.floats(allow_nan=True),
                                    st.text(max_size=2), st.none()),
                          lambda inner: st.lists(inner, max_size=4), max_leaves=20),
       drop=st.booleans())
def test_random_sglang_json(tmp_path_factory, value, drop):
    path = tmp_path_factory.mktemp("j") / "loc.json"
    path.write_text(json.dumps({"logical_count": value}))
    clean(import_sglang, path, 2, drop_zero_layers=drop)


@SETTINGS
@given(data=st.binary(max_size=300))
def test_random_bytes_as_torch_file(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("p") / "d.pt"
    path.write_bytes(data)
    clean(import_sglang, path)


@SETTINGS
@given(counts=hnp.arrays(np.int64, hnp.array_shapes(min_dims=0, max_dims=4, max_side=4),
                         elements=st.integers(-2, 20)),
       key=st.sampled_from(["logical_count", "records", "other"]))
def test_random_tensors_in_torch_dump(tmp_path_factory, counts, key):
    import torch
    path = tmp_path_factory.mktemp("t") / "d.pt"
    tensor = torch.from_numpy(counts)
    value = tensor if key != "records" else [{"forward_pass_id": 0, "rank": 0,
                                             "global_physical_count": tensor}, {"rank": 0}]
    phy2log = tensor.abs() if counts.ndim == 2 else torch.zeros(1, 1)
    torch.save({key: value, "last_physical_to_logical_map": phy2log}, path)
    clean(import_sglang, path, 1)


@SETTINGS
@given(totals=hnp.arrays(np.int64, st.tuples(st.integers(1, 3), st.integers(1, 2),
                                             st.integers(1, 5)), elements=st.integers(0, 9)),
       top_k=st.integers(1, 3), ranks=st.integers(1, 4), seed=st.integers(0, 9))
def test_spread_keeps_totals(totals, top_k, ranks, seed):
    from moesim.traces import spread_over_ranks
    tokens = int(-(-totals.sum(-1).max() // top_k))
    meta = TraceMeta(num_layers=totals.shape[1], num_ranks=1, num_experts=totals.shape[2],
                     top_k=min(top_k, totals.shape[2]), tokens_per_rank=max(tokens, 1),
                     variable_k=True, rank_resolved=False)
    trace = clean(validate, RoutingTrace(totals[:, :, None, :], meta))
    if trace is None:
        return
    spread = clean(spread_over_ranks, trace, ranks, seed)
    if spread is not None:
        np.testing.assert_array_equal(spread.counts_TLRE.sum(axis=2), totals)
