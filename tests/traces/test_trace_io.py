"""Saving and loading: exact round trips, memory-mapping, atomic writes, corrupt files."""

from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np
import pytest

from moesim.errors import MoesimError, TraceError
from moesim.traces import load_trace, save_trace
from tests.traces.tracetoys import make_trace


def assert_same(a, b):
    assert a.meta == b.meta
    np.testing.assert_array_equal(a.counts_TLRE, b.counts_TLRE)
    assert a.counts_TLRE.dtype == np.int64
    if a.topk_TLRNK is None:
        assert b.topk_TLRNK is None
    else:
        np.testing.assert_array_equal(a.topk_TLRNK, b.topk_TLRNK)


@pytest.mark.parametrize("name", ["t.npz", "tdir"])
@pytest.mark.parametrize("topk", [False, True])
def test_round_trip_is_exact(tmp_path, name, topk):
    trace = make_trace(with_topk=topk)
    save_trace(trace, tmp_path / name)
    assert_same(trace, load_trace(tmp_path / name))


def test_directory_form_is_memory_mapped(tmp_path, tiny_topk):
    save_trace(tiny_topk, tmp_path / "d")
    back = load_trace(tmp_path / "d")
    assert isinstance(back.counts_TLRE, np.memmap)
    assert isinstance(back.topk_TLRNK, np.memmap)
    assert not back.counts_TLRE.flags.writeable


def test_writes_leave_no_temporaries_and_replace(tmp_path, tiny):
    save_trace(tiny, tmp_path / "t.npz")
    save_trace(make_trace(seed=5), tmp_path / "t.npz")
    save_trace(tiny, tmp_path / "d")
    save_trace(make_trace(seed=5), tmp_path / "d")
    assert sorted(os.listdir(tmp_path)) == ["d", "t.npz"]
    assert_same(make_trace(seed=5), load_trace(tmp_path / "d"))
    assert_same(make_trace(seed=5), load_trace(tmp_path / "t.npz"))


def test_failed_write_keeps_old_file(tmp_path, tiny, monkeypatch):
    save_trace(tiny, tmp_path / "t.npz")

    def boom(*_a, **_k):
        raise OSError("disk full")
    monkeypatch.setattr(np, "savez_compressed", boom)
    with pytest.raises(MoesimError, match="cannot write .*t.npz: disk full"):
        save_trace(make_trace(seed=9), tmp_path / "t.npz")
    assert os.listdir(tmp_path) == ["t.npz"]
    assert_same(tiny, load_trace(tmp_path / "t.npz"))


def test_save_validates_first(tmp_path, tiny):
    bad = type(tiny)(tiny.counts_TLRE - 100, tiny.meta)
    with pytest.raises(TraceError, match="negative count"):
        save_trace(bad, tmp_path / "t.npz")
    assert not os.listdir(tmp_path)


def test_refuses_to_overwrite_a_non_trace_directory(tmp_path, tiny):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(TraceError, match="exists and is not a trace directory"):
        save_trace(tiny, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_missing_path(tmp_path):
    with pytest.raises(TraceError, match="no trace at .*; check the path"):
        load_trace(tmp_path / "nope.npz")


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _meta_array(meta: dict) -> np.ndarray:
    return np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)


def test_truncated_npz(tmp_path, tiny):
    save_trace(tiny, tmp_path / "t.npz")
    data = (tmp_path / "t.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match="cut.npz is not a readable .npz trace .*truncated or "
                       "corrupt, re-export it"):
        load_trace(tmp_path / "cut.npz")


def test_corrupt_member_in_npz(tmp_path, tiny):
    path = tmp_path / "t.npz"
    save_trace(tiny, path)
    data = bytearray(path.read_bytes())
    start = data.index(b"counts.npy") + 80  # inside the compressed counts stream
    data[start:start + 40] = b"\x00" * 40
    path.write_bytes(bytes(data))
    with pytest.raises(TraceError, match="not a readable .npz trace|re-export"):
        load_trace(path)


def test_random_bytes(tmp_path):
    (tmp_path / "r.npz").write_bytes(b"this is not a zip file at all")
    with pytest.raises(TraceError, match="not a readable .npz trace"):
        load_trace(tmp_path / "r.npz")


def test_bare_npy_is_not_a_trace(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros(3))
    with pytest.raises(TraceError, match="bare .npy array, not a trace archive"):
        load_trace(tmp_path / "a.npy")


def test_pickled_object_array_is_refused(tmp_path, tiny):
    arr = np.array([{"a": 1}], dtype=object)
    buf = io.BytesIO()
    np.savez(buf, counts=arr, meta_json=_meta_array(tiny.meta.to_dict()))
    (tmp_path / "p.npz").write_bytes(buf.getvalue())
    with pytest.raises(TraceError, match="not a readable .npz trace \\(ValueError"):
        load_trace(tmp_path / "p.npz")


def test_missing_array(tmp_path, tiny):
    (tmp_path / "m.npz").write_bytes(_npz_bytes(meta_json=_meta_array(tiny.meta.to_dict())))
    with pytest.raises(TraceError, match="lacks the array 'counts'; it is not a moesim trace"):
        load_trace(tmp_path / "m.npz")


def test_bad_json_meta(tmp_path, tiny):
    raw = np.frombuffer(b"{not json", dtype=np.uint8)
    (tmp_path / "j.npz").write_bytes(_npz_bytes(counts=tiny.counts_TLRE, meta_json=raw))
    with pytest.raises(TraceError, match="meta_json is not valid JSON .*corrupt, re-export"):
        load_trace(tmp_path / "j.npz")


def test_unknown_schema_version_in_file(tmp_path, tiny):
    meta = {**tiny.meta.to_dict(), "schema_version": 7}
    (tmp_path / "v.npz").write_bytes(_npz_bytes(counts=tiny.counts_TLRE,
                                                meta_json=_meta_array(meta)))
    with pytest.raises(TraceError, match="unknown schema_version 7; this moesim reads version 1"):
        load_trace(tmp_path / "v.npz")


def test_meta_contradicting_arrays_in_file(tmp_path, tiny):
    meta = {**tiny.meta.to_dict(), "num_experts": 9}
    (tmp_path / "c.npz").write_bytes(_npz_bytes(counts=tiny.counts_TLRE,
                                                meta_json=_meta_array(meta)))
    with pytest.raises(TraceError, match="metadata says num_experts = 9 but counts_TLRE has 5"):
        load_trace(tmp_path / "c.npz")


def test_directory_errors(tmp_path, tiny):
    d = tmp_path / "d"
    d.mkdir()
    with pytest.raises(TraceError, match="has no meta.json; it is not a moesim trace directory"):
        load_trace(d)
    save_trace(tiny, d)
    (d / "meta.json").write_text("{\"schema_version\": 1,")
    with pytest.raises(TraceError, match="meta.json is not valid JSON"):
        load_trace(d)
    save_trace(tiny, d)
    (d / "counts.npy").unlink()
    with pytest.raises(TraceError, match="counts.npy is missing; the trace directory is "
                       "incomplete"):
        load_trace(d)
    save_trace(tiny, d)
    data = (d / "counts.npy").read_bytes()
    (d / "counts.npy").write_bytes(data[:-16])
    with pytest.raises(TraceError, match="counts.npy is not a readable .npy array .*truncated"):
        load_trace(d)


def test_zip_without_npy_members(tmp_path):
    with zipfile.ZipFile(tmp_path / "z.npz", "w") as z:
        z.writestr("hello.txt", "hi")
    with pytest.raises(TraceError, match="lacks the array 'counts'"):
        load_trace(tmp_path / "z.npz")


def test_numpy_scalars_in_extra_are_stored_as_json(tmp_path, tiny):
    import dataclasses
    meta = dataclasses.replace(tiny.meta, extra={"a": np.int64(3), "b": np.arange(2)})
    save_trace(type(tiny)(tiny.counts_TLRE, meta), tmp_path / "t.npz")
    assert load_trace(tmp_path / "t.npz").meta.extra == {"a": 3, "b": [0, 1]}
    bad = dataclasses.replace(tiny.meta, extra={"f": object()})
    with pytest.raises(TraceError, match="extra holds a object, which JSON cannot store"):
        save_trace(type(tiny)(tiny.counts_TLRE, bad), tmp_path / "u.npz")


def test_select_iterations_and_numbers(tiny):
    part = tiny.select_iterations(1, None)
    assert part.num_passes == 2 and part.meta.first_iteration == 11
    assert list(tiny.iteration_numbers()) == [1, 11]
    np.testing.assert_array_equal(part.counts_TLRE, tiny.counts_TLRE[2:])
