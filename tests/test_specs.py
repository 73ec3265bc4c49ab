"""Specs and the built-in presets: every preset loads, derived quantities match the published
models, bad files fail with a message that names the field, and ``moesim presets`` works."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from moesim.cli import main
from moesim.errors import MoesimError
from moesim.specs import (
    PRESET_DIR,
    Cluster,
    HardwareProfile,
    LinkLevel,
    ModelSpec,
    list_presets,
    load_cluster,
    load_hardware,
    load_model,
    preset_descriptions,
    spec_to_dict,
    tomllib,  # the same TOML reader the loaders use
)

LOADERS = {"models": load_model, "clusters": load_cluster, "hardware": load_hardware}

EXPECTED = {
    "models": {"gpt-moe-s", "gpt-moe-m", "gpt-moe-l", "mixtral-8x7b-e8k2", "mixtral-8x7b-e16k4",
               "mixtral-8x22b-e8k2", "mixtral-8x22b-e16k4", "hecate-gpt-moe-s",
               "hecate-gpt-moe-l", "hecate-bert-moe", "deepseek-v3", "smartmoe-gpt", "tiny-cpu"},
    "hardware": {"a100-80g", "a100-40g", "h100-sxm", "v100", "cpu-gloo"},
    "clusters": {"a100-16x1-100g", "a100-4x8-ib800", "a100-40g-4x8-400g", "v100-32-100g",
                 "h100-4x8-ib400x8", "h100-32x8", "cpu-gloo-4"},
}


def _all_presets() -> list[tuple[str, str]]:
    return [(kind, name) for kind in LOADERS for name in list_presets(kind)]


# ------------------------------------------------------------------------------------------
# every preset loads and documents itself


def test_expected_presets_exist() -> None:
    for kind, names in EXPECTED.items():
        assert names <= set(list_presets(kind)), (kind, names - set(list_presets(kind)))


@pytest.mark.parametrize("kind,name", _all_presets())
def test_preset_loads_with_description_and_source(kind: str, name: str) -> None:
    spec = LOADERS[kind](name)
    assert spec.name == name
    assert spec.description and "\n" not in spec.description
    assert spec.source
    assert spec_to_dict(spec)["name"] == name


@pytest.mark.parametrize("kind,name", _all_presets())
def test_every_number_in_a_preset_has_a_comment(kind: str, name: str) -> None:
    """A numeric value carries a comment on its line or in the comment block right above it
    (the lines since the previous blank line)."""
    if name == "tiny-cpu":  # a test fixture, not a claim about any real model
        return
    lines = (PRESET_DIR / kind / f"{name}.toml").read_text().splitlines()
    block: list[str] = []
    for i, line in enumerate(lines):
        if not line.strip():
            block = []
            continue
        block.append(line)
        code = line.split("#")[0]
        if "=" not in code or code.strip().startswith("["):
            continue
        try:
            value = next(iter(tomllib.loads(code).values()))
        except (ValueError, StopIteration):
            continue  # the start of a multi-line array: its comment is checked like any line
        if isinstance(value, bool) or not isinstance(value, (int, float, list)):
            continue
        assert any("#" in b for b in block), (
            f"{kind}/{name}.toml line {i + 1} has no source comment: {line!r}")


def test_preset_descriptions_helper() -> None:
    for kind in LOADERS:
        desc = preset_descriptions(kind)
        assert list(desc) == list_presets(kind)
        assert all(desc.values())
    assert "replace with `moesim calibrate`" in preset_descriptions("hardware")["cpu-gloo"]
    assert "PLACEHOLDER" in preset_descriptions("clusters")["cpu-gloo-4"]


def test_load_by_path_and_by_name_with_suffix(tmp_path: Path) -> None:
    src = PRESET_DIR / "models" / "gpt-moe-s.toml"
    copy = tmp_path / "mine.toml"
    copy.write_text(src.read_text().replace("num_experts = 16", "num_experts = 32"))
    assert load_model(copy).num_experts == 32
    assert load_model(copy).name == "mine"
    assert load_model("gpt-moe-s.toml") == load_model("gpt-moe-s")


def test_cluster_hardware_relative_path_and_inline(tmp_path: Path) -> None:
    (tmp_path / "hw.toml").write_text((PRESET_DIR / "hardware" / "v100.toml").read_text())
    text = (PRESET_DIR / "clusters" / "v100-32-100g.toml").read_text()
    (tmp_path / "c.toml").write_text(text.replace('hardware = "v100"', 'hardware = "hw.toml"'))
    cluster = load_cluster(tmp_path / "c.toml")
    assert cluster.hardware.name == "hw" and cluster.hardware.peak_flops == 125e12
    inline = text.replace('hardware = "v100"', "").rstrip() + (
        "\n\n[hardware]\npeak_flops = 1e12\nmem_bw_GBps = 100.0\n")
    (tmp_path / "i.toml").write_text(inline)
    assert load_cluster(tmp_path / "i.toml").hardware.name == "i-hw"


# ------------------------------------------------------------------------------------------
# derived quantities against the published models


def test_mixtral_8x7b_params() -> None:
    m = load_model("mixtral-8x7b-e8k2")
    assert m.params_per_expert == 3 * 4096 * 14336
    assert m.expert_params_per_layer == 8 * 3 * 4096 * 14336
    assert m.expert_flops_per_token == 2 * 3 * 4096 * 14336
    assert m.expert_weight_bytes == 2 * 3 * 4096 * 14336
    assert m.total_params == pytest.approx(46.7e9, rel=0.01)   # Mistral AI: 46.7B total
    assert m.active_params == pytest.approx(12.9e9, rel=0.01)  # ... and 12.9B active
    assert m.token_bytes == 4096 * 2


def test_e16k4_splits_each_expert_in_two() -> None:
    for size in ("8x7b", "8x22b"):
        e8, e16 = load_model(f"mixtral-{size}-e8k2"), load_model(f"mixtral-{size}-e16k4")
        assert (e16.num_experts, e16.top_k) == (2 * e8.num_experts, 2 * e8.top_k)
        assert e16.ffn_hidden_size * 2 == e8.ffn_hidden_size
        assert e16.expert_params_per_layer == e8.expert_params_per_layer
        assert e16.top_k * e16.expert_flops_per_token == e8.top_k * e8.expert_flops_per_token
        assert (e16.num_layers, e16.hidden_size) == (e8.num_layers, e8.hidden_size)
    assert load_model("mixtral-8x22b-e8k2").total_params == pytest.approx(141e9, rel=0.01)


def test_laer_batch_is_128_sequences_on_32_gpus() -> None:
    for name in ("mixtral-8x7b-e8k2", "mixtral-8x22b-e16k4"):
        m = load_model(name)
        assert m.seq_len == 8192
        assert 32 * m.tokens_per_rank * m.micro_batches == 128 * 8192


def test_swiftmoe_gpt_models() -> None:
    for name, layers, hidden, active in (("gpt-moe-s", 12, 768, 125e6),
                                         ("gpt-moe-m", 24, 1024, 350e6),
                                         ("gpt-moe-l", 24, 1536, 760e6)):
        m = load_model(name)
        assert (m.num_layers, m.hidden_size, m.ffn_hidden_size) == (layers // 2, hidden,
                                                                    4 * hidden)
        assert (m.num_experts, m.top_k, m.gated, m.seq_len) == (16, 1, False, 512)
        assert m.params_per_expert == 2 * hidden * 4 * hidden
        assert 16 * m.tokens_per_rank * m.micro_batches == 64 * 512  # global batch 64 on 16
        # with top-1 the active parameters are the dense GPT the model was built from
        assert m.active_params == pytest.approx(active, rel=0.05)


def test_deepseek_v3() -> None:
    m = load_model("deepseek-v3")
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size) == (58, 7168, 2048)
    assert (m.num_experts, m.top_k, m.num_shared_experts, m.gated) == (256, 8, 1, True)
    assert m.total_params == pytest.approx(671e9, rel=0.01)
    assert m.active_params == pytest.approx(37e9, rel=0.05)


def test_hecate_models_in_the_papers_range() -> None:
    for name in ("hecate-gpt-moe-s", "hecate-gpt-moe-l", "hecate-bert-moe"):
        m = load_model(name)
        assert (m.num_experts, m.top_k) == (64, 2)
        assert 1.8e9 <= m.total_params <= 7.4e9


def test_smartmoe_gpt_matches_the_trace() -> None:
    m = load_model("smartmoe-gpt")
    assert (m.num_layers, m.num_experts, m.top_k) == (24, 32, 2)
    assert (m.tokens_per_rank, m.micro_batches) == (2048, 4)
    trace = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "smartmoe-trace"
    table = trace / "table_iter101_rank0.log"
    if not table.is_file():
        pytest.skip(f"SmartMoE trace sample not found at {trace}")
    lines = table.read_text().strip().splitlines()
    assert len(lines) == m.num_layers
    rows = json.loads(lines[0].split(":", 1)[1])
    assert len(rows) == m.micro_batches and len(rows[0]) == m.num_experts
    assert sum(rows[0]) == pytest.approx(m.tokens_per_rank * m.top_k)


def test_tiny_cpu_is_fp32_and_small() -> None:
    m = load_model("tiny-cpu")
    assert (m.bytes_weight, m.bytes_grad, m.bytes_activation) == (4.0, 4.0, 4.0)
    assert m.total_params < 1e6 and m.tokens_per_rank * m.micro_batches <= 1024


def test_default_dense_flops_and_params_formula() -> None:
    m = ModelSpec(name="t", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_experts=8,
                  top_k=2, seq_len=16, num_shared_experts=1)
    assert m.attention_flops_per_token == 8 * 64**2 + 4 * 16 * 64 + 2 * 3 * 64 * 128
    assert m.dense_params == 4 * 64**2 + 3 * 64 * 128
    assert m.total_params == 2 * (8 * 3 * 64 * 128 + m.dense_params)


# ------------------------------------------------------------------------------------------
# hardware and clusters


def test_h100_gemm_curve_matches_design_measurement() -> None:
    """DESIGN.md: a 28672x8192 bf16 weight costs ~165 us flat up to m~128 on an H100, and GEMMs
    reach 70-76% of peak past m~2048."""
    hw = load_hardware("h100-sxm")
    flat = hw.gemm_time_s(np.array([1, 8, 32, 64, 128]), 28672, 8192)
    assert np.all(np.abs(flat - 165e-6) < 10e-6), flat
    assert np.ptp(flat) < 1e-9  # flat: weight-read bound
    eff = hw.gemm_efficiency(np.array([2048, 4096, 8192, 16384, 65536]))
    assert np.all((eff >= 0.70) & (eff <= 0.76))
    assert np.all(np.diff(hw.gemm_efficiency(2.0 ** np.arange(15))) >= 0)
    assert hw.peak_flops == pytest.approx(989e12, rel=0.01)


@pytest.mark.parametrize("name,peak,datasheet_GBps", [("a100-80g", 312e12, 2039),
                                                      ("a100-40g", 312e12, 1555),
                                                      ("h100-sxm", 989.4e12, 3350),
                                                      ("v100", 125e12, 900)])
def test_gpu_profiles_against_datasheets(name: str, peak: float, datasheet_GBps: float) -> None:
    hw = load_hardware(name)
    assert hw.peak_flops == peak
    assert 0.8 * datasheet_GBps <= hw.mem_bw_GBps <= datasheet_GBps
    assert 0 < hw.launch_s < 20e-6 and 0 < hw.collective_latency_s < 50e-6


def test_clusters_shape_and_links() -> None:
    laer = load_cluster("a100-4x8-ib800")
    assert (laer.world_size, laer.gpus_per_node) == (32, 8)
    assert laer.intra.bw_GBps == pytest.approx(216.27, abs=0.01)       # LAER measured
    assert laer.inter.bw_GBps * 8 == pytest.approx(88.95, abs=0.05)     # per-GPU share
    assert laer.node_of(np.arange(32)).tolist() == [r // 8 for r in range(32)]
    swift = load_cluster("a100-16x1-100g")
    assert (swift.num_nodes, swift.gpus_per_node, swift.world_size) == (16, 1, 16)
    assert swift.inter.bw_GBps < 12.5  # below 100 Gbps line rate
    h100 = load_cluster("h100-4x8-ib400x8")
    assert h100.intra.bw_GBps == 370.0 and 46 <= h100.inter.bw_GBps <= 49
    assert h100.host.bw_GBps == 50.0 and laer.host.bw_GBps == 25.0
    assert load_cluster("h100-32x8").world_size == 256
    assert load_cluster("v100-32-100g").world_size == 32
    assert load_cluster("a100-40g-4x8-400g").hardware.name == "a100-40g"
    cpu = load_cluster("cpu-gloo-4")
    assert (cpu.world_size, cpu.hardware.name) == (4, "cpu-gloo")
    for name in list_presets("clusters"):
        c = load_cluster(name)
        assert c.inter.bw_GBps <= c.intra.bw_GBps
        assert c.hardware.name in list_presets("hardware")


def test_with_shape_keeps_links() -> None:
    c = load_cluster("h100-4x8-ib400x8").with_shape(2)
    assert c.world_size == 16 and c.inter.bw_GBps == 48.0


# ------------------------------------------------------------------------------------------
# bad files and bad values: MoesimError naming the field


def _model_text(**changes: str | None) -> str:
    """tiny-cpu.toml with fields replaced (None: removed) or appended."""
    lines, todo = [], dict(changes)
    for line in (PRESET_DIR / "models" / "tiny-cpu.toml").read_text().splitlines():
        key = line.split("=")[0].strip()
        if key in todo:
            value = todo.pop(key)
            if value is not None:
                lines.append(f"{key} = {value}")
            continue
        lines.append(line)
    lines += [f"{key} = {value}" for key, value in todo.items() if value is not None]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("changes,field", [
    ({"num_expertz": "8"}, "unknown ModelSpec field.*num_expertz"),
    ({"hidden_size": None}, "hidden_size"),
    ({"hidden_size": "-64"}, "hidden_size"),
    ({"bytes_optim": "-1"}, "bytes_optim"),
    ({"num_layers": "0"}, "num_layers"),
    ({"num_layers": "2.5"}, "num_layers"),
    ({"top_k": "9"}, "top_k"),
    ({"seq_len": '"long"'}, "seq_len"),
    ({"gated": '"yes"'}, "gated"),
    ({"dense_flops_per_token": "-5.0"}, "dense_flops_per_token"),
])
def test_bad_model_file_names_the_field(tmp_path: Path, changes: dict, field: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(_model_text(**changes))
    with pytest.raises(MoesimError, match=field) as info:
        load_model(path)
    assert str(path) in str(info.value)


def test_bad_toml_syntax(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("num_layers = = 2\n")
    with pytest.raises(MoesimError, match="cannot parse"):
        load_model(path)


def test_bad_json_top_level(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("[1, 2]")
    with pytest.raises(MoesimError, match="top level"):
        load_model(path)


def test_unknown_preset_name_lists_choices() -> None:
    with pytest.raises(MoesimError, match="gpt-moe-s"):
        load_model("no-such-model")
    with pytest.raises(MoesimError, match="unknown preset kind"):
        list_presets("gpus")


def _cluster_text(old: str, new: str) -> str:
    text = (PRESET_DIR / "clusters" / "cpu-gloo-4.toml").read_text()
    assert old in text
    return text.replace(old, new, 1)


@pytest.mark.parametrize("old,new,match", [
    ("bw_GBps = 0.5", "bw_GBps = -0.5", r"\[intra\].*bw_GBps"),
    ("latency_s = 2e-3", "latency_s = -1.0", r"\[intra\].*latency_s"),
    ("bw_GBps = 0.5", "bw_gbps = 0.5", r"\[intra\].*unknown LinkLevel field.*bw_gbps"),
    ("num_nodes = 1", "num_nodes = 0", "num_nodes"),
    ("gpus_per_node = 4 ", "gpus_per_node = 1.5 ", "gpus_per_node"),
    ('hardware = "cpu-gloo"', 'hardware = "no-such-hw"', "no hardware preset"),
    ('hardware = "cpu-gloo"', "hardware = 3", "Cluster.hardware"),
    ("[host]", "[hostx]", r"unknown Cluster field.*hostx"),
])
def test_bad_cluster_file_names_the_field(tmp_path: Path, old: str, new: str,
                                          match: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(_cluster_text(old, new))
    with pytest.raises(MoesimError, match=match):
        load_cluster(path)


def test_cluster_missing_link_table(tmp_path: Path) -> None:
    text = (PRESET_DIR / "clusters" / "cpu-gloo-4.toml").read_text()
    path = tmp_path / "bad.toml"
    path.write_text(text.split("[host]")[0])
    with pytest.raises(MoesimError, match=r"missing Cluster field.*host"):
        load_cluster(path)


@pytest.mark.parametrize("line,match", [
    ("gemm_eff_curve = [[128, 0.5], [64, 0.6]]", "gemm_eff_curve"),
    ("gemm_eff_curve = [[1, 1.5]]", "gemm_eff_curve"),
    ("gemm_eff_curve = [[1]]", "gemm_eff_curve"),
    ("gemm_eff_curve = []", "gemm_eff_curve"),
    ("launch_s = -1e-6", "launch_s"),
    ("collective_latency_s = -1e-6", "collective_latency_s"),
    ("peak_flops = 0", "peak_flops"),
    ("elementwise_eff = 1.5", "elementwise_eff"),
])
def test_bad_hardware_file_names_the_field(tmp_path: Path, line: str, match: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f'peak_flops = 1e12\nmem_bw_GBps = 100.0\n{line}\n'.replace(
        "peak_flops = 1e12\n", "" if line.startswith("peak_flops") else "peak_flops = 1e12\n"))
    with pytest.raises(MoesimError, match=match):
        load_hardware(path)


def test_direct_construction_validates() -> None:
    with pytest.raises(MoesimError, match="bw_GBps"):
        LinkLevel(bw_GBps=float("nan"), latency_s=0.0)
    with pytest.raises(MoesimError, match="mem_bw_GBps"):
        HardwareProfile(name="x", peak_flops=1e12, mem_bw_GBps=-1.0)
    hw = HardwareProfile(name="x", peak_flops=1e12, mem_bw_GBps=1.0)
    link = LinkLevel(bw_GBps=1.0, latency_s=0.0)
    with pytest.raises(MoesimError, match="Cluster.inter"):
        Cluster(name="c", num_nodes=1, gpus_per_node=1, intra=link, inter=None, host=link,
                gpu_memory_GiB=1.0, hardware=hw)
    m = ModelSpec(name="m", num_layers=2.0, hidden_size=8, ffn_hidden_size=8, num_experts=2,
                  top_k=1)
    assert isinstance(m.num_layers, int)
    assert math.isclose(m.replace(top_k=2).top_k, 2)


# ------------------------------------------------------------------------------------------
# moesim presets


def test_cli_lists_all_kinds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for kind, names in EXPECTED.items():
        assert kind in out
        assert all(name in out for name in names)


def test_cli_lists_one_kind(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets", "clusters"]) == 0
    out = capsys.readouterr().out
    assert "h100-4x8-ib400x8" in out and "mixtral" not in out


def test_cli_prints_a_preset_that_loads_back(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets", "models", "mixtral-8x7b-e8k2"]) == 0
    text = capsys.readouterr().out
    assert "hidden_size = 4096" in text and "#" in text
    copy = tmp_path / "copy.toml"
    copy.write_text(text)
    assert load_model(copy).replace(name="mixtral-8x7b-e8k2") == load_model("mixtral-8x7b-e8k2")


def test_cli_bad_name_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets", "models", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "gpt-moe-s" in err
