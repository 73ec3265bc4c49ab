"""``moesim run`` / ``moesim validate`` under ``--parallel``: the executor's plumbing.

- Rank 0's side without ranks: the programs ``moesim run`` plans under a layout are the ones
  ``moesim simulate`` lowers (same prepare / view cluster / decision / lowering), and the record
  it builds from measured times is the simulator's record — fed the simulator's own schedule as
  "measured" times, every array and summary column of the RunResult is identical, the layout
  in config.json too.
- The gate: a layout :mod:`moesim.executor.capabilities` refuses is a one-line error, exit 2,
  before any rank starts (no run directory); a layout it accepts runs end to end on 2 gloo
  ranks and its RunResult carries the layout and per-stage arrays as the simulator's does.
- Per-stage errors (:mod:`moesim.executor.validate_stages`) against a naive reduction.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest

pytest.importorskip("torch", reason="the executor needs torch")

from moesim.cli import main  # noqa: E402
from moesim.layout import parse_layout  # noqa: E402
from moesim.results import load_run  # noqa: E402
from moesim.specs import load_cluster, load_model  # noqa: E402

WORLD = 2
# layouts at world size 2 that issue 14 asks the executor to run (1F1B, 4 micro-batches for PP)
LAYOUTS = ("tp=2,sp=true", "pp=2,pp_schedule=1f1b", "recompute=full", "zero=1",
           "a2a_overlap=true", "etp=2", "etp=2,recompute=full")
# layouts the executor refuses (executor/capabilities.py): CP, TP without SP, selective
# recomputation of a module its model does not have
REFUSED = ("cp=2", "tp=2", "recompute=selective,recompute_modules=layernorm")
PROBES = (*LAYOUTS, *REFUSED)


def _trace(path, sources: int, micro_batches: int = 4):
    from moesim.traces.io import save_trace
    from moesim.traces.synth import SynthConfig, synthesize

    cfg = SynthConfig(num_layers=2, num_ranks=sources, num_experts=8, top_k=2,
                      tokens_per_rank=256, micro_batches_per_iteration=micro_batches,
                      num_iterations=2, doc_tokens=32)
    return save_trace(synthesize(cfg, rng=sources), path)


def _sources(text: str) -> int:
    return WORLD // parse_layout(text).pp


def _args(trace, parallel: str | None, **kw) -> argparse.Namespace:
    base = dict(trace=str(trace), model="tiny-cpu", policy="static_ep", knob=[], cluster=None,
                iterations="0:2", out="", seed=0, warmup=0, parallel=parallel, regroup=False)
    return argparse.Namespace(**{**base, **kw})


def _planned(monkeypatch, args):
    from moesim.executor import worker

    monkeypatch.setattr(worker.dist, "get_backend", lambda *a, **k: "gloo")
    model, config, items = worker._planned(args, WORLD, cuda=False)
    return model, config, list(items)


def _simulated_times(program, cluster):
    """Per-rank OpTimes holding the simulator's schedule of ``program`` (as if measured)."""
    from moesim.costmodel import CostModel
    from moesim.engine import schedule
    from moesim.executor.timing import OpTimes

    sched = schedule(program.ops, CostModel(cluster).durations(program), program.num_ranks)
    times = []
    for r in range(program.num_ranks):
        ok = np.flatnonzero(np.isfinite(sched.start_OR[:, r]))
        times.append(OpTimes(events=[(int(i), float(sched.start_OR[i, r]),
                                      float(sched.end_OR[i, r])) for i in ok], host="h"))
    return times


@pytest.mark.parametrize("text", ["tp=2,sp=true", "pp=2,pp_schedule=1f1b"])
def test_layout_record_is_the_simulators(tmp_path, monkeypatch, text):
    from moesim.executor.record import build_record
    from moesim.results import RunWriter
    from moesim.simulate import simulate

    trace = _trace(tmp_path / "t.npz", _sources(text))
    cluster = load_cluster("cpu-gloo-4").with_shape(1, WORLD)
    layout = parse_layout(text)
    simulate(trace, load_model("tiny-cpu"), cluster, "static_ep", iterations=(0, 2),
             out_dir=tmp_path / "sim", progress=False, layout=layout)
    model, config, items = _planned(monkeypatch, _args(trace, text))
    writer = RunWriter(tmp_path / "exe", config, "executor")
    for item in items:
        assert item.layout_plan is not None and item.context.program is item.program
        writer.add(build_record(item.context, _simulated_times(item.program, cluster),
                                item.iteration, layout_plan=item.layout_plan))
    writer.finish()
    sim, exe = load_run(tmp_path / "sim"), load_run(tmp_path / "exe")
    assert exe.config["parallel"] == sim.config["parallel"]
    assert len(exe.config["parallel"]["stages"]) == layout.pp
    for name in ("busy_s", "start_s", "end_s", "rank_tokens", "dropped", "traffic_bytes"):
        np.testing.assert_allclose(exe[name], sim[name], rtol=1e-5, err_msg=name)
    assert set(exe.summary) == set(sim.summary) - {"oom"}
    for col in exe.summary:
        np.testing.assert_allclose(exe.summary[col], sim.summary[col], rtol=1e-6, err_msg=col)


def test_default_layout_plans_without_a_layout_plan(tmp_path, monkeypatch):
    trace = _trace(tmp_path / "t.npz", WORLD, micro_batches=2)
    _, config, items = _planned(monkeypatch, _args(trace, None))
    assert "parallel" not in config and "regroup" not in config["options"]
    assert [it.iteration for it in items] == [0, 1]
    assert all(it.layout_plan is None for it in items)


def test_trace_ranks_are_checked_and_regrouped_as_in_simulate(tmp_path, monkeypatch):
    from moesim.errors import MoesimError

    trace = _trace(tmp_path / "t.npz", WORLD)            # 2 sources; PP 2 has 1 per stage
    with pytest.raises(MoesimError, match="pass --regroup"):
        _planned(monkeypatch, _args(trace, "pp=2"))
    _, config, items = _planned(monkeypatch, _args(trace, "pp=2", regroup=True))
    assert config["options"]["regroup"] is True
    assert config["trace"]["meta"]["num_ranks"] == 1
    with pytest.raises(MoesimError, match="pass --regroup"):   # the default layout too
        _planned(monkeypatch, _args(_trace(tmp_path / "t4.npz", 4), None))


def _refused(text: str) -> str | None:
    from moesim.executor.capabilities import unsupported

    return unsupported(parse_layout(text))


@pytest.mark.slow
@pytest.mark.parametrize("text", PROBES)
def test_run_refuses_or_runs_the_layout(tmp_path, capfd, text):
    """A refused layout fails in one line before any rank starts; every other runs on 2 gloo
    ranks and records the layout as the simulator does."""
    assert bool(_refused(text)) == (text in REFUSED), _refused(text)
    trace = _trace(tmp_path / "t.npz", _sources(text))
    out = tmp_path / "run"
    capfd.readouterr()
    rc = main(["run", "--trace", str(trace), "--model", "tiny-cpu", "--world-size", str(WORLD),
               "--iterations", "0:1", "--out", str(out), "--parallel", text,
               "--hang-timeout-s", "90"])
    err = capfd.readouterr().err.strip()
    if _refused(text):
        assert rc == 2
        assert err.startswith("moesim: error: the executor does not run") and "\n" not in err
        assert not out.exists()
        return
    assert rc == 0, err
    run = load_run(out)
    assert run.complete and run.config["parallel"]["pp"] == parse_layout(text).pp
    assert run["rank_tokens"].shape[-1] == WORLD


def test_validate_refuses_a_refused_layout_before_writing(tmp_path, capfd):
    text = REFUSED[0]
    out = tmp_path / "val"
    rc = main(["validate", "--traces", "synth", "--model", "tiny-cpu", "--world-sizes", "2",
               "--out", str(out), "--parallel", text])
    err = capfd.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "does not run" in err
    assert not out.exists()


def test_stage_rows_reduce_each_stages_ranks(tmp_path):
    from moesim.executor.validate_stages import stage_ranks, stage_rows
    from moesim.ops import PHASES
    from moesim.simulate import simulate

    trace = _trace(tmp_path / "t.npz", 1)
    model = load_model("tiny-cpu")
    layout = parse_layout("pp=2")
    runs = []
    for name, preset in (("a", "cpu-gloo-4"), ("b", "h100-4x8-ib400x8")):
        simulate(trace, model, load_cluster(preset).with_shape(1, WORLD), "static_ep",
                 iterations=(0, 2), out_dir=tmp_path / name, progress=False, layout=layout)
        runs.append(load_run(tmp_path / name))
    pred, meas = runs
    assert stage_ranks(pred) == [(0, 1), (1, 2)]
    assert all(r["mape_pct"] == 0 for r in stage_rows(pred, [pred], np.array([0, 1])))
    rows = {r["quantity"]: r for r in stage_rows(pred, [meas, meas], np.array([0, 1]))}
    assert {q.split()[0] for q in rows} == {"s0", "s1"}
    busy_p, busy_m = np.asarray(pred["busy_s"]), np.asarray(meas["busy_s"])
    for q, row in rows.items():
        k, f = int(q.split()[0][1:]), PHASES.index(q.split()[1])
        p_I, m_I = busy_p[:, :, f, k].sum(axis=1), busy_m[:, :, f, k].sum(axis=1)
        assert row["predicted_s"] == pytest.approx(p_I.mean())
        assert row["mape_pct"] == pytest.approx(np.mean(np.abs(p_I - m_I) / m_I) * 100)
    assert stage_rows(pred, [meas], np.array([0])) and not stage_rows(
        load_run(_default_sim(tmp_path, model)), [meas], np.array([0]))


def _default_sim(tmp_path, model):
    from moesim.simulate import simulate

    trace = _trace(tmp_path / "t2.npz", WORLD, micro_batches=2)
    simulate(trace, model, load_cluster("cpu-gloo-4").with_shape(1, WORLD), "static_ep",
             iterations=(0, 1), out_dir=tmp_path / "d", progress=False)
    return tmp_path / "d"


@pytest.mark.slow
def test_validate_compares_per_stage_under_pp(tmp_path, capfd):
    """`moesim validate --parallel pp=2` runs both backends under the layout and reports each
    stage's phases beside the world's, in the table, validation.csv and --json."""
    import csv
    import json

    text = "pp=2,pp_schedule=1f1b"
    assert not _refused(text)
    out = tmp_path / "val"
    capfd.readouterr()
    rc = main(["validate", "--traces", "synth", "--model", "tiny-cpu", "--world-sizes", "2",
               "--iterations", "0:1", "--micro-batches", "4", "--warmup", "1",
               "--parallel", text, "--out", str(out), "--json", "--hang-timeout-s", "90"])
    printed = capfd.readouterr()
    assert rc == 0, printed.err[-2000:]
    name = "synth-static_ep-w2-pp2_pp_schedule1f1b"
    measured, predicted = load_run(out / name / "measured"), load_run(out / name / "predicted")
    assert measured.config["parallel"] == predicted.config["parallel"]
    assert measured.config["trace"]["meta"]["num_ranks"] == 1          # one stage's sources
    assert measured.config["model"]["micro_batches"] == 4
    rows = json.loads(printed.out)["configs"][0]["rows"]
    quantities = [r["quantity"] for r in rows]
    assert {"s0 expert", "s1 expert", "s0 pp_send", "s1 pp_send"} <= set(quantities)
    assert quantities.index("step") < quantities.index("s0 expert")
    assert [r["quantity"] for r in csv.DictReader(open(out / "validation.csv"))] == quantities
    assert "s1 expert" in printed.err  # the table (stderr under --json)
