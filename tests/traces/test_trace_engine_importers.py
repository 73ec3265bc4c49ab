"""Engine importers: Megatron-Core router traces, TensorRT-LLM ExpertStatistic, vLLM EPLB.

Each test writes files the way the engine does (from the format in the module docstrings, which
summarise the engines' code) and checks the imported counts exactly against the choices it made.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from moesim.cli import main
from moesim.errors import TraceError
from moesim.traces import load_trace
from moesim.traces.import_megatron import import_megatron
from moesim.traces.import_trtllm import import_trtllm
from moesim.traces.import_vllm import import_vllm


def choices(rng, n, E, k):
    """``[n, k]`` distinct expert ids per token."""
    return np.argsort(rng.random((n, E)), axis=1)[:, :k]


# ---------------------------------------------------------------------------------- Megatron


def write_megatron(folder, ids_SMLRNK, first_step=0, mtp_layers=0, ranks_of_layer=None,
                   k=2):
    """Write router_trace_rank{r}.jsonl as Megatron's RouterTracer does: per step, per
    micro-batch, per layer (1-based), one record; MTP records after the decoder's."""
    folder.mkdir(exist_ok=True)
    S, M, L, R, N, _ = ids_SMLRNK.shape
    ranks = sorted({r for v in ranks_of_layer for r in v}) if ranks_of_layer else range(R)
    lines = {r: [] for r in ranks}
    for s in range(S):
        for m in range(M):
            for layer in range(L):
                for j in range(R):
                    rank = ranks_of_layer[layer][j] if ranks_of_layer else j
                    rec = {"step": first_step + s, "stage": "pre_dispatch", "block": "decoder",
                           "layer": layer + 1, "rank": rank, "num_tokens": N, "topk": k,
                           "top_indices": ids_SMLRNK[s, m, layer, j].tolist()}
                    lines[rank].append(json.dumps(rec))
                    if layer < mtp_layers:
                        mtp = dict(rec, block="mtp", mtp_idx=0, layer=layer + 1,
                                   top_indices=ids_SMLRNK[s, m, layer, j][:, ::-1].tolist())
                        lines[rank].append(json.dumps(mtp))
    for rank, text in lines.items():
        (folder / f"router_trace_rank{rank}.jsonl").write_text("\n".join(text) + "\n")
    return folder


def megatron_ids(S=3, M=2, L=2, R=2, N=6, E=8, k=2, seed=0):
    rng = np.random.default_rng(seed)
    out = np.zeros((S, M, L, R, N, k), dtype=np.int64)
    for idx in np.ndindex(S, M, L, R):
        out[idx] = choices(rng, N, E, k)
    return out


def bincounts(ids_NK, E):
    return np.bincount(ids_NK.ravel(), minlength=E)


def test_megatron_counts_micro_batches_and_steps_exact(tmp_path):
    ids = megatron_ids()
    write_megatron(tmp_path / "m", ids, first_step=0)
    trace = import_megatron(tmp_path / "m", num_experts=8)
    m = trace.meta
    assert (m.num_layers, m.num_ranks, m.num_experts, m.top_k, m.tokens_per_rank) == (2, 2, 8, 2,
                                                                                      6)
    assert (m.micro_batches_per_iteration, m.variable_k, m.first_iteration) == (2, False, 0)
    assert m.extra["routers"] == ["decoder/1", "decoder/2"]
    for s, mb, layer, r in np.ndindex(3, 2, 2, 2):
        np.testing.assert_array_equal(trace.counts_TLRE[s * 2 + mb, layer, r],
                                      bincounts(ids[s, mb, layer, r], 8))


def test_megatron_mtp_excluded_by_default_and_included_on_request(tmp_path):
    ids = megatron_ids(L=2)
    write_megatron(tmp_path / "m", ids, mtp_layers=1)
    plain = import_megatron(tmp_path / "m", num_experts=8)
    assert plain.meta.num_layers == 2 and plain.meta.extra["mtp_records"] == 3 * 2 * 2
    assert plain.meta.extra["mtp"].startswith("excluded")
    both = import_megatron(tmp_path / "m", num_experts=8, include_mtp=True)
    assert both.meta.num_layers == 3
    assert both.meta.extra["routers"] == ["decoder/1", "decoder/2", "mtp0/1"]
    # the MTP router's ids were written reversed per token: same counts as decoder layer 1
    np.testing.assert_array_equal(both.counts_TLRE[:, 2], both.counts_TLRE[:, 0])
    np.testing.assert_array_equal(both.counts_TLRE[:, :2], plain.counts_TLRE)


def test_megatron_pipeline_stages_map_ranks_per_layer(tmp_path):
    ids = megatron_ids(L=2, R=2)
    # PP 2: layer 1 lives on ranks 0, 1; layer 2 on ranks 2, 3
    write_megatron(tmp_path / "m", ids, ranks_of_layer=[[0, 1], [2, 3]])
    trace = import_megatron(tmp_path / "m", num_experts=8)
    assert trace.meta.num_ranks == 2
    assert trace.meta.extra["ranks_of_layer"] == [[0, 1], [2, 3]]
    np.testing.assert_array_equal(trace.counts_TLRE[0, 1, 1], bincounts(ids[0, 0, 1, 1], 8))


def test_megatron_variable_tokens_and_keep_topk(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    rng = np.random.default_rng(1)
    ids = {(s, r): choices(rng, 3 + s, 6, 2) for s in range(2) for r in range(2)}
    for r in range(2):
        text = [json.dumps({"step": s, "stage": "pre_dispatch", "block": "decoder", "layer": 1,
                            "rank": r, "num_tokens": 3 + s, "topk": 2,
                            "top_indices": ids[s, r].tolist()}) for s in range(2)]
        (folder / f"router_trace_rank{r}.jsonl").write_text("\n".join(text))
    trace = import_megatron(folder, keep_topk=True)
    assert trace.meta.variable_k and trace.meta.tokens_per_rank == 4
    assert trace.meta.num_experts == int(max(v.max() for v in ids.values())) + 1
    np.testing.assert_array_equal(trace.topk_TLRNK[0, 0, 1, :3], ids[0, 1])
    assert (trace.topk_TLRNK[0, 0, 1, 3] == -1).all()


@pytest.mark.parametrize("edit, message", [
    (lambda recs: recs[:-1], "no record for"),
    (lambda recs: recs + recs[:1], "different numbers of records"),
    (lambda recs: [dict(recs[0], num_tokens=99)] + recs[1:], "num_tokens = 99"),
    (lambda recs: [dict(recs[0], top_indices=[[1, 1]] * recs[0]["num_tokens"])] + recs[1:],
     "same expert twice"),
    (lambda recs: [dict(recs[0], rank=5)] + recs[1:], "rank 5"),
    (lambda recs: [dict(recs[0], block="encoder")] + recs[1:], "neither"),
    (lambda recs: [dict(recs[0], step="x")] + recs[1:], "step"),
    (lambda recs: [dict(recs[0], top_indices=[[0.5, 1]] * recs[0]["num_tokens"])] + recs[1:],
     "not whole numbers"),
    (lambda recs: [dict(recs[0], top_indices=[["1", "2"]] * recs[0]["num_tokens"])]
     + recs[1:], "not whole numbers"),
    (lambda recs: [dict(recs[0], top_indices=[[1, [2]]] * recs[0]["num_tokens"])] + recs[1:],
     "ragged"),
])
def test_megatron_damaged_records(tmp_path, edit, message):
    folder = write_megatron(tmp_path / "m", megatron_ids(S=2, M=1, L=1, R=2))
    path = folder / "router_trace_rank0.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    path.write_text("\n".join(json.dumps(r) for r in edit(recs)) + "\n")
    with pytest.raises(TraceError, match=message):
        import_megatron(folder)


def test_megatron_bad_inputs(tmp_path):
    with pytest.raises(TraceError, match="not a directory"):
        import_megatron(tmp_path / "nothing")
    (tmp_path / "e").mkdir()
    with pytest.raises(TraceError, match="holds no"):
        import_megatron(tmp_path / "e")
    folder = write_megatron(tmp_path / "m", megatron_ids(S=1, M=1, L=1, R=3))
    (folder / "router_trace_rank1.jsonl").unlink()
    with pytest.raises(TraceError, match=r"rank\(s\) 1"):
        import_megatron(folder)
    (folder / "router_trace_rank1.jsonl").mkdir()
    with pytest.raises(TraceError, match="not a regular file"):
        import_megatron(folder)
    (folder / "router_trace_rank1.jsonl").rmdir()
    (folder / "router_trace_rank1.jsonl").write_text("{not json\n")
    with pytest.raises(TraceError, match="line 1 is not JSON"):
        import_megatron(folder)


def test_megatron_cli(tmp_path, capsys):
    write_megatron(tmp_path / "m", megatron_ids(), mtp_layers=1)
    out = tmp_path / "m.npz"
    assert main(["trace", "import", "megatron", str(tmp_path / "m"), "-o", str(out),
                 "--include-mtp", "--experts", "8"]) == 0
    assert "3 layers, 2 ranks, 8 experts, top-2" in capsys.readouterr().out
    assert load_trace(out).meta.extra["mtp"] == "included"
    assert main(["trace", "import", "megatron", str(tmp_path / "nope"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a directory" in err


# ---------------------------------------------------------------------------------- TensorRT-LLM


def write_trtllm(folder, ids_by_rank, E, k, with_tokens=False):
    """ExpertStatistic as TensorRT-LLM writes it: meta_info.json, then per rank the counts
    ``"{iter}_{layer}"`` -> int32 [E] (and the per-token ids when asked)."""
    from safetensors.numpy import save_file

    folder.mkdir(exist_ok=True)
    (folder / "meta_info.json").write_text(json.dumps({"num_experts": E,
                                                       "num_experts_per_token": k}))
    for r, cells in ids_by_rank.items():
        save_file({f"{i}_{layer}": bincounts(ids, E).astype(np.int32)
                   for (i, layer), ids in cells.items()}, str(folder / f"rank{r}.safetensors"))
        if with_tokens:
            save_file({f"{i}_{layer}": ids.astype(np.int32) for (i, layer), ids in cells.items()},
                      str(folder / f"token_selected_experts_rank{r}.safetensors"))
    return folder


def trtllm_ids(iters=(100, 101, 102), layers=(3, 4, 5), R=2, E=8, k=2, seed=0):
    rng = np.random.default_rng(seed)
    return {r: {(i, layer): choices(rng, int(rng.integers(1, 9)), E, k) for i in iters
                for layer in layers} for r in range(R)}


def test_trtllm_counts_exact(tmp_path):
    pytest.importorskip("safetensors", reason="safetensors not installed (moesim[safetensors])")
    ids = trtllm_ids()
    write_trtllm(tmp_path / "t", ids, 8, 2, with_tokens=True)
    trace = import_trtllm(tmp_path / "t")
    m = trace.meta
    assert (m.num_layers, m.num_ranks, m.num_experts, m.top_k) == (3, 2, 8, 2)
    assert (m.first_iteration, m.iteration_stride, m.variable_k) == (100, 1, True)
    assert m.extra["layer_ids"] == [3, 4, 5] and m.extra["cells_checked_against_token_ids"] == 18
    for (r, cells) in ids.items():
        for (i, layer), chosen in cells.items():
            np.testing.assert_array_equal(trace.counts_TLRE[i - 100, layer - 3, r],
                                          bincounts(chosen, 8))


def test_trtllm_missing_cell_counts_zero_and_errors(tmp_path):
    pytest.importorskip("safetensors", reason="safetensors not installed (moesim[safetensors])")
    from safetensors.numpy import save_file

    ids = trtllm_ids(R=2)
    del ids[1][(101, 4)]
    folder = write_trtllm(tmp_path / "t", ids, 8, 2)
    trace = import_trtllm(folder)
    assert trace.counts_TLRE[1, 1, 1].sum() == 0
    save_file({"101_4": np.zeros(5, np.int32)}, str(folder / "rank1.safetensors"))
    with pytest.raises(TraceError, match=r"expected integer counts \[8\]"):
        import_trtllm(folder)
    save_file({"weights": np.zeros(8, np.int32)}, str(folder / "rank1.safetensors"))
    with pytest.raises(TraceError, match="not '{iter}_{layer}'"):
        import_trtllm(folder)
    (folder / "rank1.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(TraceError, match="not a readable safetensors"):
        import_trtllm(folder)
    (folder / "meta_info.json").unlink()
    with pytest.raises(TraceError, match="no meta_info.json"):
        import_trtllm(folder)


def test_trtllm_token_ids_must_agree(tmp_path):
    pytest.importorskip("safetensors", reason="safetensors not installed (moesim[safetensors])")
    from safetensors.numpy import save_file

    ids = trtllm_ids(R=1)
    folder = write_trtllm(tmp_path / "t", ids, 8, 2, with_tokens=True)
    save_file({"100_3": np.array([[0, 1]], np.int32)},
              str(folder / "token_selected_experts_rank0.safetensors"))
    with pytest.raises(TraceError, match="disagree"):
        import_trtllm(folder)


def test_trtllm_without_safetensors_one_line(tmp_path, monkeypatch, capsys):
    import sys

    ids = trtllm_ids(R=1)
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "meta_info.json").write_text('{"num_experts": 8, "num_experts_per_token": 2}')
    (folder / "rank0.safetensors").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    assert ids
    assert main(["trace", "import", "trtllm", str(folder), "-o", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'moesim[safetensors]'" in err


# ---------------------------------------------------------------------------------- vLLM


def vllm_state(W=5, L=2, E=4, P=6, step=2, filled=4, seed=0):
    """A window as vLLM's EplbModelState holds it, and the logical counts it stands for."""
    rng = np.random.default_rng(seed)
    phy2log = np.stack([np.concatenate([rng.permutation(E), rng.integers(0, E, P - E)])
                        for _ in range(L)])
    window = np.zeros((W, L, P), dtype=np.int64)
    logical = []
    for n in range(filled):            # pass n is written at slot (step - filled + n) mod W
        slot = (step - filled + n) % W
        log_LE = rng.integers(0, 20, (L, E))
        logical.append(log_LE)
        for layer in range(L):
            for e in range(E):         # split expert e's load over its physical copies
                copies = np.flatnonzero(phy2log[layer] == e)
                share = rng.multinomial(log_LE[layer, e], np.full(len(copies), 1 / len(copies)))
                window[slot, layer, copies] = share
    return window, phy2log, np.stack(logical)


def test_vllm_torch_window_unrolled_and_mapped(tmp_path):
    torch = pytest.importorskip("torch")
    window, phy2log, logical = vllm_state()
    path = tmp_path / "eplb.pt"
    torch.save({"expert_load_window": torch.from_numpy(window),
                "physical_to_logical_map": torch.from_numpy(phy2log),
                "expert_load_window_step": 2}, path)
    trace = import_vllm(path)
    assert trace.meta.rank_resolved is False and trace.meta.extra["dropped_empty_passes"] == 1
    np.testing.assert_array_equal(trace.counts_TLRE[:, :, 0], logical)


def test_vllm_naive_all2all_divides_by_dp(tmp_path):
    torch = pytest.importorskip("torch")
    window, phy2log, logical = vllm_state()
    path = tmp_path / "eplb.pt"
    torch.save({"expert_load_window": torch.from_numpy(window * 4),
                "physical_to_logical_map": torch.from_numpy(phy2log),
                "expert_load_window_step": 2}, path)
    np.testing.assert_array_equal(import_vllm(path, naive_dp_size=4).counts_TLRE[:, :, 0],
                                  logical)
    with pytest.raises(TraceError, match="not a multiple of --naive-dp-size 3"):
        import_vllm(path, naive_dp_size=3)


def test_vllm_json_forms(tmp_path):
    window, phy2log, logical = vllm_state(step=4, filled=4)
    hist = tmp_path / "h.json"
    hist.write_text(json.dumps({"load_history": [{"logical_expert_load": x.tolist()}
                                                 for x in logical]}))
    np.testing.assert_array_equal(import_vllm(hist).counts_TLRE[:, :, 0], logical)
    raw = tmp_path / "w.json"
    raw.write_text(json.dumps({"expert_load_window": window.tolist(),
                               "physical_to_logical_map": phy2log.tolist(),
                               "expert_load_window_step": 4}))
    np.testing.assert_array_equal(import_vllm(raw).counts_TLRE[:, :, 0], logical)


def test_vllm_errors(tmp_path):
    torch = pytest.importorskip("torch")
    window, phy2log, _ = vllm_state()
    bad = tmp_path / "b.pt"
    torch.save({"expert_load_window": torch.from_numpy(window[:, :, :3]),
                "physical_to_logical_map": torch.from_numpy(phy2log)}, bad)
    with pytest.raises(TraceError, match="local experts"):
        import_vllm(bad)
    torch.save({"something": 1}, bad)
    with pytest.raises(TraceError, match="lacks expert_load_window"):
        import_vllm(bad)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"expert_load_window": Evil()}, bad, _use_new_zipfile_serialization=True)
    with pytest.raises(TraceError, match="weights-only"):
        import_vllm(bad)
    (tmp_path / "d.pt").mkdir()
    with pytest.raises(TraceError, match="not a regular file"):
        import_vllm(tmp_path / "d.pt")
    (tmp_path / "h.json").write_text('{"load_history": []}')
    with pytest.raises(TraceError, match="empty"):
        import_vllm(tmp_path / "h.json")


def test_vllm_cli_and_simulate_spreads(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    window, phy2log, logical = vllm_state()
    torch.save({"expert_load_window": torch.from_numpy(window * 2),
                "physical_to_logical_map": torch.from_numpy(phy2log),
                "expert_load_window_step": 2}, tmp_path / "e.pt")
    out = tmp_path / "v.npz"
    assert main(["trace", "import", "vllm", str(tmp_path / "e.pt"), "-o", str(out),
                 "--naive-dp-size", "2"]) == 0
    assert "4 passes" in capsys.readouterr().out
    np.testing.assert_array_equal(load_trace(out).counts_TLRE[:, :, 0], logical)
