"""Importers: SmartMoE/FastMoE logs, SGLang dumps, EPLB weights, long CSV."""

from __future__ import annotations

import json
import pickle
import re

import numpy as np
import pytest
import torch

from moesim.cli import main
from moesim.errors import TraceError
from moesim.traces import (
    export_csv,
    import_csv,
    import_eplb,
    import_sglang,
    import_smartmoe,
    load_trace,
)
from tests.traces.tracetoys import make_trace

# ---------------------------------------------------------------------------------- SmartMoE


def write_smartmoe(folder, counts_IMLRE, first=1, stride=10, fmt="{:.1f}"):
    """Write ``[iterations, micro-batches, layers, ranks, experts]`` as table logs."""
    folder.mkdir(exist_ok=True)
    I, M, L, R, E = counts_IMLRE.shape
    for i in range(I):
        for r in range(R):
            lines = []
            for layer in range(L):
                rows = ", ".join("[" + ", ".join(fmt.format(v) for v in counts_IMLRE[i, :, layer,
                                                                                       r][m])
                                 + "]" for m in range(M))
                lines.append(f"{layer}:[{rows}]")
            (folder / f"table_iter{first + i * stride}_rank{r}.log").write_text(
                "\n".join(lines) + "\n")
    return folder


def small_counts(I=3, M=2, L=2, R=3, E=4, k=2, N=5, seed=0):
    trace = make_trace(T=I * M, L=L, R=R, E=E, k=k, N=N, mb=M, seed=seed)
    return trace.counts_TLRE.reshape(I, M, L, R, E)


def test_smartmoe_infers_everything(tmp_path):
    c = small_counts()
    write_smartmoe(tmp_path / "s", c, first=5, stride=7)
    (tmp_path / "s" / "LICENSE").write_text("Apache License\nVersion 2.0, January 2004")
    trace = import_smartmoe(tmp_path / "s")
    m = trace.meta
    assert (m.num_layers, m.num_ranks, m.num_experts, m.micro_batches_per_iteration) == (2, 3,
                                                                                        4, 2)
    assert (m.top_k, m.tokens_per_rank, m.variable_k) == (2, 5, False)
    assert (m.first_iteration, m.iteration_stride, m.license) == (5, 7, "Apache-2.0")
    np.testing.assert_array_equal(trace.counts_TLRE, c.reshape(6, 2, 3, 4))


def test_smartmoe_top_k_option(tmp_path):
    write_smartmoe(tmp_path / "s", small_counts(k=2, N=6))
    assert import_smartmoe(tmp_path / "s", top_k=1).meta.tokens_per_rank == 12
    with pytest.raises(TraceError, match="exceeds tokens_per_rank = 3; a token picks an expert "
                       "at most once"):
        import_smartmoe(tmp_path / "s", top_k=4)
    with pytest.raises(TraceError, match="rows sum to between 12 and 12 \\(top_k = 5\\), so "
                       "tokens x top_k is not fixed; check --top-k"):
        import_smartmoe(tmp_path / "s", top_k=5)


def test_smartmoe_missing_file(tmp_path):
    write_smartmoe(tmp_path / "s", small_counts())
    (tmp_path / "s" / "table_iter11_rank1.log").unlink()
    with pytest.raises(TraceError, match=r"1 file\(s\) missing, e.g. table_iter11_rank1.log"):
        import_smartmoe(tmp_path / "s")


def test_smartmoe_missing_rank(tmp_path):
    write_smartmoe(tmp_path / "s", small_counts())
    for p in (tmp_path / "s").glob("*_rank1.log"):
        p.unlink()
    with pytest.raises(TraceError, match="ranks must be 0..R-1 but no file has rank 1"):
        import_smartmoe(tmp_path / "s")


def test_smartmoe_missing_iteration(tmp_path):
    write_smartmoe(tmp_path / "s", small_counts(I=4))
    for p in (tmp_path / "s").glob("table_iter11_*.log"):
        p.unlink()
    with pytest.raises(TraceError, match=r"not evenly spaced \(stride 10\); missing "
                       r"table_iter\{N\} for N in 11"):
        import_smartmoe(tmp_path / "s")


def test_smartmoe_ragged_rows(tmp_path):
    write_smartmoe(tmp_path / "s", small_counts())
    p = tmp_path / "s" / "table_iter1_rank0.log"
    p.write_text(p.read_text().replace("], [", ", 1.0], [", 1))
    with pytest.raises(TraceError, match=r"table_iter1_rank0.log line 1 has ragged rows "
                       r"\(lengths \[4, 5\]\)"):
        import_smartmoe(tmp_path / "s")


def test_smartmoe_non_integral(tmp_path):
    write_smartmoe(tmp_path / "s", small_counts() + 0.25, fmt="{:.2f}")
    with pytest.raises(TraceError, match="non-integer count 0.25|non-integer count .*\\.25"):
        import_smartmoe(tmp_path / "s")


def test_smartmoe_nan_and_negative(tmp_path):
    write_smartmoe(tmp_path / "s", small_counts())
    p = tmp_path / "s" / "table_iter1_rank0.log"
    text = p.read_text()
    p.write_text(re.sub(r"\d+\.0", "nan", text, count=1))
    with pytest.raises(TraceError, match="contains NaN or infinity"):
        import_smartmoe(tmp_path / "s")
    p.write_text(re.sub(r"(\d+)\.0", r"-\1.0", text, count=1))
    with pytest.raises(TraceError, match="negative count"):
        import_smartmoe(tmp_path / "s")


def test_smartmoe_malformed_line(tmp_path):
    write_smartmoe(tmp_path / "s", small_counts())
    p = tmp_path / "s" / "table_iter21_rank2.log"
    p.write_text(p.read_text()[:-20])  # truncated
    with pytest.raises(TraceError, match="table_iter21_rank2.log line 2 is not "
                       "'layer:\\[\\[...\\], ...\\]'; the file is truncated"):
        import_smartmoe(tmp_path / "s")
    p.write_text("0:[[1.0, x]]\n")
    with pytest.raises(TraceError, match="line 1 has a value that is not a number"):
        import_smartmoe(tmp_path / "s")
    p.write_text("")
    with pytest.raises(TraceError, match="table_iter21_rank2.log is empty"):
        import_smartmoe(tmp_path / "s")


def test_smartmoe_shape_mismatch_between_files(tmp_path):
    write_smartmoe(tmp_path / "s", small_counts())
    p = tmp_path / "s" / "table_iter11_rank0.log"
    p.write_text(p.read_text().splitlines()[0] + "\n")
    with pytest.raises(TraceError, match="table_iter11_rank0.log has shape .* \\[1, 2, 4\\] but "
                       "table_iter1_rank0.log has \\[2, 2, 4\\]"):
        import_smartmoe(tmp_path / "s")


def test_smartmoe_uneven_rows(tmp_path):
    c = small_counts()
    c[0, 0, 0, 0, 0] -= 1  # one token picked only one expert
    write_smartmoe(tmp_path / "s", c)
    with pytest.raises(TraceError, match="rows sum to between 9 and 10 .* pass --allow-uneven"):
        import_smartmoe(tmp_path / "s")
    trace = import_smartmoe(tmp_path / "s", allow_uneven=True)
    assert trace.meta.variable_k and trace.meta.tokens_per_rank == 5


def test_smartmoe_not_a_folder(tmp_path):
    with pytest.raises(TraceError, match="is not a directory"):
        import_smartmoe(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TraceError, match="holds no table_iter\\{N\\}_rank\\{r\\}.log files"):
        import_smartmoe(tmp_path / "empty")


def _parse_independently(path):
    """A naive parser for the acceptance test: eval-free, regex-based."""
    table = []
    for line in path.read_text().splitlines():
        _, body = line.split(":", 1)
        rows = re.findall(r"\[([^\[\]]*)\]", body)
        table.append([[float(v) for v in row.split(",")] for row in rows])
    return np.array(table)  # [L, M, E]


def test_acceptance_smartmoe_sample(smartmoe_dir, tmp_path, capsys):
    out = tmp_path / "x.npz"
    assert main(["trace", "import", "smartmoe", str(smartmoe_dir), "-o", str(out)]) == 0
    trace = load_trace(out)
    m = trace.meta
    assert trace.counts_TLRE.shape == (200, 24, 16, 32)
    assert (m.first_iteration, m.iteration_stride, m.micro_batches_per_iteration) == (1, 10, 4)
    assert (m.top_k, m.tokens_per_rank, m.license) == (2, 2048, "GPL-3.0")
    for iteration, rank in ((1, 0), (241, 7), (491, 15)):
        table_LME = _parse_independently(smartmoe_dir / f"table_iter{iteration}_rank{rank}.log")
        i = (iteration - 1) // 10
        got_MLE = trace.counts_TLRE[4 * i:4 * i + 4, :, rank, :]
        np.testing.assert_array_equal(got_MLE, table_LME.transpose(1, 0, 2))
    capsys.readouterr()
    assert main(["trace", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "200 passes = 50 iterations x 4 micro-batches (iterations 1..491 stride 10)" in text
    assert re.search(r"^\s+23\s+[\d.]+\s+[\d.]+", text, re.M)
    assert "first 1-161" in text and "last 331-491" in text

# ------------------------------------------------------------------------------------ SGLang


def test_sglang_stat_pt(tmp_path):
    counts = torch.tensor(make_trace(R=1).counts_TLRE[:, :, 0], dtype=torch.int32)
    torch.save({"rank": 0, "logical_count": counts}, tmp_path / "stat.pt")
    trace = import_sglang(tmp_path / "stat.pt", micro_batches=2)
    assert not trace.meta.rank_resolved and trace.meta.num_ranks == 1
    assert (trace.meta.tokens_per_rank, trace.meta.variable_k) == (6, False)
    np.testing.assert_array_equal(trace.counts_TLRE[:, :, 0], counts.numpy())


def test_sglang_refuses_pickled_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"logical_count": Evil()}, f, protocol=2)
    with pytest.raises(TraceError, match="not a readable weights-only torch file .* will not "
                       "unpickle"):
        import_sglang(tmp_path / "evil.pt")


def test_sglang_stat_missing_key(tmp_path):
    torch.save({"rank": 0}, tmp_path / "s.pt")
    with pytest.raises(TraceError, match="has no \"logical_count\"; expected an SGLang stat"):
        import_sglang(tmp_path / "s.pt")


def test_sglang_json_with_dense_layers(tmp_path):
    rows = [[0] * 4] * 2 + [[3, 1, 0, 2], [1, 1, 2, 2]]
    (tmp_path / "loc.json").write_text(json.dumps({"logical_count": rows}))
    kept = import_sglang(tmp_path / "loc.json", top_k=2)
    assert kept.meta.num_layers == 4 and kept.meta.variable_k
    assert kept.meta.tokens_per_rank == 3
    dropped = import_sglang(tmp_path / "loc.json", top_k=2, drop_zero_layers=True)
    assert dropped.meta.num_layers == 2 and not dropped.meta.variable_k
    assert dropped.meta.extra == {"dropped_zero_layers": [0, 1]}


def test_sglang_json_errors(tmp_path):
    (tmp_path / "a.json").write_text("{\"logical_count\": [[1, 2], [3]]}")
    with pytest.raises(TraceError, match="logical_count is ragged or not numeric"):
        import_sglang(tmp_path / "a.json")
    (tmp_path / "b.json").write_text("{\"other\": 1}")
    with pytest.raises(TraceError, match="has no \"logical_count\" key"):
        import_sglang(tmp_path / "b.json")
    (tmp_path / "c.json").write_text("{")
    with pytest.raises(TraceError, match="is not valid JSON"):
        import_sglang(tmp_path / "c.json")


def test_sglang_per_pass_maps_physical_to_logical(tmp_path):
    # 2 layers, 3 physical slots over 2 logical experts: slot 2 replicates expert 0 / 1.
    phy2log = torch.tensor([[0, 1, 0], [1, 0, 1]])
    for rank in range(2):
        records = [{"forward_pass_id": p, "rank": rank,
                    "global_physical_count": torch.tensor([[1 + p, 2, 1 + rank],
                                                           [2, 2 + rank, p]])}
                   for p in range(3)]
        torch.save({"records": records, "last_physical_to_logical_map": phy2log},
                   tmp_path / f"rank{rank}.pt")
    trace = import_sglang(tmp_path, top_k=1)
    assert trace.meta.rank_resolved and trace.counts_TLRE.shape == (3, 2, 2, 2)
    np.testing.assert_array_equal(trace.counts_TLRE[1, 0, 1], [2 + 2, 2])  # slots 0+2 → e0
    np.testing.assert_array_equal(trace.counts_TLRE[2, 1, 0], [2, 2 + 2])  # slots 0+2 → e1
    assert import_sglang(tmp_path / "rank0.pt", top_k=1).meta.num_ranks == 1


def test_sglang_per_pass_missing_record(tmp_path):
    phy2log = torch.tensor([[0, 1]])
    recs = [{"forward_pass_id": 0, "rank": r, "global_physical_count": torch.tensor([[1, 1]])}
            for r in range(2)] + [{"forward_pass_id": 1, "rank": 0,
                                   "global_physical_count": torch.tensor([[1, 1]])}]
    torch.save({"records": recs, "last_physical_to_logical_map": phy2log}, tmp_path / "d.pt")
    with pytest.raises(TraceError, match=r"no record for \(pass, rank\) \(1, 1\)"):
        import_sglang(tmp_path / "d.pt")

# -------------------------------------------------------------------------------------- EPLB


def test_eplb_npy_and_csv(tmp_path):
    weight = np.array([[4, 0, 2, 2], [1, 3, 3, 1]])
    np.save(tmp_path / "w.npy", weight)
    np.savetxt(tmp_path / "w.csv", weight, fmt="%d", delimiter=",")
    for name in ("w.npy", "w.csv"):
        trace = import_eplb(tmp_path / name, top_k=2)
        assert trace.counts_TLRE.shape == (1, 2, 1, 4) and not trace.meta.rank_resolved
        assert trace.meta.tokens_per_rank == 4
        np.testing.assert_array_equal(trace.counts_TLRE[0, :, 0], weight)


def test_eplb_errors(tmp_path):
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(TraceError, match="not a readable .npy array .* holds Python objects"):
        import_eplb(tmp_path / "o.npy")
    np.save(tmp_path / "f.npy", np.array([[1.5, 2.0]]))
    with pytest.raises(TraceError, match="non-integer count 1.5"):
        import_eplb(tmp_path / "f.npy")
    np.save(tmp_path / "v.npy", np.arange(4))
    with pytest.raises(TraceError, match="weight has shape \\(4,\\); expected \\[layers, "
                       "experts\\]"):
        import_eplb(tmp_path / "v.npy")
    (tmp_path / "r.csv").write_text("1,2,3\n4,5\n")
    with pytest.raises(TraceError, match="rows have different lengths"):
        import_eplb(tmp_path / "r.csv")
    (tmp_path / "h.csv").write_text("a,b\n1,2\n")
    with pytest.raises(TraceError, match="not a number; expected one row of E numbers per "
                       "layer, no header"):
        import_eplb(tmp_path / "h.csv")

# --------------------------------------------------------------------------------------- CSV


def test_csv_round_trip(tmp_path, tiny):
    export_csv(tiny, tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_text().startswith("pass,layer,rank,expert,count\n0,0,0,0,")
    back = import_csv(tmp_path / "t.csv", top_k=2, micro_batches=2)
    np.testing.assert_array_equal(back.counts_TLRE, tiny.counts_TLRE)
    assert back.meta.tokens_per_rank == tiny.meta.tokens_per_rank


def test_csv_sparse_rows_default_to_zero(tmp_path):
    (tmp_path / "s.csv").write_text("pass,layer,rank,expert,count\n0,0,0,1,2\n0,0,1,0,2\n")
    trace = import_csv(tmp_path / "s.csv", top_k=1)
    np.testing.assert_array_equal(trace.counts_TLRE[0, 0], [[0, 2], [2, 0]])


@pytest.mark.parametrize("text,message", [
    ("layer,pass,rank,expert,count\n0,0,0,0,1\n", "the first line must be "
     "pass,layer,rank,expert,count"),
    ("pass,layer,rank,expert,count\n", "has a header but no rows"),
    ("pass,layer,rank,expert,count\n0,0,0,0,1\n0,0,0,0,1\n", "appears twice"),
    ("pass,layer,rank,expert,count\n0,0,0,0\n", "rows have 4 columns; expected 5"),
    ("pass,layer,rank,expert,count\n0,0,0,0,x\n", "a row is not 5 numbers"),
    ("pass,layer,rank,expert,count\n0,-1,0,0,1\n", "index is negative"),
    ("pass,layer,rank,expert,count\n0,0.5,0,0,1\n", "must be whole numbers"),
    ("pass,layer,rank,expert,count\n0,0,0,0,-3\n", "negative count"),
    ("pass,layer,rank,expert,count\n0,0,0,0,1.5\n", "non-integer count 1.5"),
])
def test_csv_errors(tmp_path, text, message):
    (tmp_path / "e.csv").write_text(text)
    with pytest.raises(TraceError, match=message):
        import_csv(tmp_path / "e.csv")


def test_sglang_stat_drops_empty_buffer_slots(tmp_path):
    counts = np.zeros((5, 2, 4), dtype=np.int32)
    counts[1] = [[2, 0, 1, 1], [1, 1, 1, 1]]
    counts[3] = [[0, 2, 2, 0], [4, 0, 0, 0]]
    torch.save({"rank": 0, "logical_count": torch.from_numpy(counts),
                "average_utilization_rate_over_window": None}, tmp_path / "stat.pt")
    trace = import_sglang(tmp_path / "stat.pt", top_k=1)
    assert trace.num_passes == 2 and trace.meta.extra == {"dropped_empty_passes": 3}
    torch.save({"logical_count": torch.zeros(2, 2, 4)}, tmp_path / "empty.pt")
    with pytest.raises(TraceError, match="every pass is all zero; nothing was recorded"):
        import_sglang(tmp_path / "empty.pt")


def test_sglang_per_pass_sums_overlap_halves_and_rejects_duplicates(tmp_path):
    phy2log = torch.tensor([[0, 1]])
    rec = {"forward_pass_id": 0, "rank": 0, "global_physical_count": torch.tensor([[1, 2]])}
    torch.save({"records": [{**rec, "gatherer_key": "a"}, {**rec, "gatherer_key": "b"}],
                "last_physical_to_logical_map": phy2log}, tmp_path / "tbo.pt")
    trace = import_sglang(tmp_path / "tbo.pt", top_k=1)
    np.testing.assert_array_equal(trace.counts_TLRE[0, 0, 0], [2, 4])
    torch.save({"records": [rec, rec], "last_physical_to_logical_map": phy2log},
               tmp_path / "dup.pt")
    with pytest.raises(TraceError, match="pass 0 rank 0 appears twice"):
        import_sglang(tmp_path / "dup.pt", top_k=1)
