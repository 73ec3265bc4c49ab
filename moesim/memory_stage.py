"""Per-stage, per-rank memory under a parallel layout, and the table naming the peak.

Shape legend: ``n`` ranks of the stage, ``M`` micro-batches (trace passes), ``L`` the stage's
MoE layers (``Stage.moe_layers`` order).

Contract with the lowering — :func:`stage_memory` is called once per pipeline stage with:

- ``stage``: a :class:`moesim.stages.Stage` (its ranks and its chunks of transformer layers,
  dense layers numbered first), ``num_stages`` = ``pp``, ``micro_batches`` = ``m`` per
  iteration, ``tokens`` = tokens of one micro-batch of one model replica (``s·b``, before TP
  or CP split them);
- ``expert_state_R``: ``{"weights", "grads", "optimizer"}`` → ``[n]`` bytes of the stage's
  routed experts on each rank. With ``layout.zero`` None that is the policy's own footprint
  for the stage (:func:`expert_state_from_footprint` strips the dense part every policy adds);
  with ZeRO 0–3 :func:`expert_state_zero` shards it over EDP. Other keys (a policy's prefetch
  or replica buffers) are carried through unchanged;
- ``rows_MLR``: ``[M, L, n]`` rows each rank's experts compute per micro-batch and MoE layer
  (micro-batch ``j`` of the schedule uses ``j mod M``), ``dropped_MLR`` the tokens each rank's
  routing dropped (for the all-to-all send buffer), ``host_R`` the policy's host memory.

Components (bytes per rank): ``weights``, ``grads``, ``optimizer`` — the stage's non-expert
parameters (:func:`~moesim.memory_layout.stage_dense_params`) divided by TP, their state sharded
over DP×CP (Megatron's distributed optimizer spans both) by ZeRO stage (None: ZeRO-1, the
dense scheme of every policy), plus the experts' state; ``activations`` — the peak, over the
schedule's steps (:func:`moesim.pipeline.schedule_steps`), of the micro-batches in flight,
each chunk pass holding its layers' activations (:mod:`moesim.memory_layout`; fused attention
unless ``flash=False``), the MoE layers' expert rows from the actual ``rows_MLR`` so the hot
rank's peak shows, and with full recompute one layer re-materialised during its backward;
``a2a_buffers`` (the send and receive buffers of the largest dispatch, as
:mod:`moesim.memory`), ``tp_buffers`` (one all-gathered activation), ``pp_buffers`` (the
activation send and gradient receive of one micro-batch), ``param_gather`` (ZeRO-3: two
layers' gathered dense weights; :func:`expert_state_zero` adds ``expert_gather`` for the
experts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moesim import memory_layout as ml
from moesim.layout import ParallelLayout
from moesim.pipeline import schedule_steps
from moesim.specs import ModelSpec
from moesim.stages import Stage

STATE_KEYS = ("weights", "grads", "optimizer")
BUFFER_KEYS = ("a2a_buffers", "tp_buffers", "pp_buffers", "param_gather")


@dataclass(frozen=True)
class StageMemory:
    """One stage's memory: ``gpu`` and ``host`` components, each ``[n]`` bytes per rank, and
    the micro-batches in flight at the activation peak (in whole-stage units)."""

    stage: int
    ranks: np.ndarray
    gpu: dict[str, np.ndarray]
    host: dict[str, np.ndarray] = field(default_factory=dict)
    in_flight: float = 0.0

    @property
    def total_R(self) -> np.ndarray:
        return sum((np.asarray(v, dtype=float) for v in self.gpu.values()),
                   np.zeros(len(self.ranks)))

    @property
    def peak_rank(self) -> int:
        """World rank with the most GPU memory in this stage."""
        return int(self.ranks[int(np.argmax(self.total_R))])


def layout_split(layout: ParallelLayout, flash: bool = True) -> ml.ActivationSplit:
    """The :class:`~moesim.memory_layout.ActivationSplit` of a layout's layers."""
    mods = tuple(layout.recompute_modules) if layout.recompute == "selective" else ()
    return ml.ActivationSplit(t=layout.tp, sp=layout.sp, c=layout.cp, et=layout.etp,
                              modules=mods, flash=flash)


def dense_layer_act_bytes(model: ModelSpec, tokens: float, split: ml.ActivationSplit) -> float:
    """A dense-only layer: attention + norms + an MLP of ``dense_ffn_size``."""
    return (ml.attention_bytes(tokens, model.seq_len, ml.attention_dims(model), split,
                               model.bytes_activation)
            + ml.layernorm_bytes(tokens, model.hidden_size, split, model.bytes_activation)
            + ml.mlp_bytes(tokens, model.hidden_size, model.dense_ffn_size, model.gated, split,
                           model.bytes_activation))


def moe_layer_fixed_bytes(model: ModelSpec, tokens: float, split: ml.ActivationSplit) -> float:
    """An MoE layer's activations outside its routed rows: attention, norms, the MoE block's
    tokens (router, shared experts) and any dense blocks folded into the layer."""
    b, h = model.bytes_activation, model.hidden_size
    return (ml.attention_bytes(tokens, model.seq_len, ml.attention_dims(model), split, b)
            + ml.layernorm_bytes(tokens, h, split, b)
            + ml.moe_token_bytes(tokens, h, model.num_experts,
                                 model.num_shared_experts * model.ffn_hidden_size, model.gated,
                                 split, b)
            + model.dense_blocks_per_moe_layer * dense_layer_act_bytes(model, tokens, split))


@dataclass(frozen=True)
class _Chunk:
    fixed: float                 # bytes per micro-batch, equal on every rank
    moe_rows: tuple[int, ...]    # stage MoE-layer positions whose rows are kept
    working: float               # full-recompute re-materialisation during backward (fixed)
    working_rows: tuple[int, ...]


def _chunks(model: ModelSpec, layout: ParallelLayout, stage: Stage, num_stages: int,
            tokens: float, flash: bool) -> list[_Chunk]:
    split = layout_split(layout, flash)
    plain = ml.ActivationSplit(t=split.t, sp=split.sp, c=split.c, et=split.et, flash=flash)
    moe_pos = {layer: j for j, layer in enumerate(
        layer for layer in stage.layers if layer >= stage.num_dense_layers)}
    out = []
    for v, chunk in enumerate(stage.chunks):
        n_rec = (len(chunk) if layout.recompute_num_layers is None
                 else layout.recompute_num_layers) if layout.recompute == "full" else 0
        fixed = working = 0.0
        rows, wrows = [], ()
        for k, layer in enumerate(chunk):
            is_moe = layer in moe_pos
            full = (moe_layer_fixed_bytes(model, tokens, plain) if is_moe
                    else dense_layer_act_bytes(model, tokens, plain))
            if k < n_rec:
                fixed += ml.full_recompute_layer_bytes(tokens, model.hidden_size, split,
                                                       model.bytes_activation)
                if full > working:
                    working, wrows = full, ((moe_pos[layer],) if is_moe else ())
                continue
            fixed += (moe_layer_fixed_bytes(model, tokens, split) if is_moe
                      else dense_layer_act_bytes(model, tokens, split))
            if is_moe:
                rows.append(moe_pos[layer])
        if stage.index == 0 and v == 0:
            fixed += ml.embedding_bytes(tokens, model.hidden_size, split)
        if stage.index == num_stages - 1 and v == len(stage.chunks) - 1:
            fixed += ml.output_layer_bytes(tokens, model.hidden_size, model.vocab_size, split)
        out.append(_Chunk(fixed, tuple(rows), working, wrows))
    return out


def peak_activations_R(model: ModelSpec, layout: ParallelLayout, stage: Stage,
                       num_stages: int, micro_batches: int, tokens: float,
                       rows_MLR: np.ndarray, flash: bool = True) -> tuple[np.ndarray, float]:
    """``([n] peak activation bytes, micro-batches in flight at the peak)``: the schedule's
    steps run in order; a forward adds its chunk's activations for that micro-batch, a
    backward (after re-materialising a fully recomputed layer) frees them."""
    chunks = _chunks(model, layout, stage, num_stages, tokens, flash)
    n, M = stage.num_ranks, max(rows_MLR.shape[0], 1)
    row_b = ml.expert_row_bytes(model.hidden_size, model.ffn_hidden_size, model.gated,
                                layout_split(layout, flash), model.bytes_activation)
    full_row_b = ml.expert_row_bytes(model.hidden_size, model.ffn_hidden_size, model.gated,
                                     ml.ActivationSplit(et=layout.etp), model.bytes_activation)

    def act(mb: int, rows: tuple[int, ...], per_row: float) -> np.ndarray:
        if not rows:
            return np.zeros(n)
        return rows_MLR[mb % M][list(rows)].sum(axis=0) * per_row

    live, peak = np.zeros(n), np.zeros(n)
    count = peak_count = 0
    for step in schedule_steps(layout.pp_schedule, stage.index, layout.pp, micro_batches,
                               layout.vpp, layout.a2a_overlap):
        for s in ((step.fwd, step.bwd) if step.kind == "FB" else (step,)):
            c = chunks[s.chunk]
            held = c.fixed + act(s.mb, c.moe_rows, row_b)
            if s.kind == "F":
                live, count = live + held, count + 1
                peak, peak_count = np.maximum(peak, live), max(peak_count, count)
            else:
                if c.working:
                    peak = np.maximum(peak, live + c.working
                                      + act(s.mb, c.working_rows, full_row_b))
                live, count = live - held, count - 1
    return peak, peak_count / len(chunks)


def stage_memory(*, model: ModelSpec, layout: ParallelLayout, stage: Stage, num_stages: int,
                 micro_batches: int, tokens: float, expert_state_R: dict[str, np.ndarray],
                 rows_MLR: np.ndarray, dropped_MLR: np.ndarray | None = None,
                 host_R: dict[str, np.ndarray] | None = None,
                 flash: bool = True) -> StageMemory:
    """One stage's per-rank memory (module docstring: the contract and the components)."""
    n, t = stage.num_ranks, layout.tp
    rows_MLR = np.asarray(rows_MLR, dtype=float)
    if rows_MLR.ndim != 3 or rows_MLR.shape[1:] != (len(stage.moe_layers), n):
        raise ValueError(f"stage {stage.index}: rows_MLR must be [M, {len(stage.moe_layers)}"
                         f" MoE layers, {n} ranks], got shape {rows_MLR.shape}")
    first, last = stage.index == 0, stage.index == num_stages - 1
    n_dense = sum(1 for layer in stage.layers if layer < stage.num_dense_layers)
    dense_params = ml.stage_dense_params(model, n_dense, len(stage.moe_layers), first, last,
                                         num_stages) / t
    zero = 1 if layout.zero is None else layout.zero
    per_param = ml.state_bytes_per_param(zero, model.bytes_weight, model.bytes_grad,
                                         model.bytes_optim, n // t)
    gpu = {k: np.full(n, dense_params * b) for k, b in zip(STATE_KEYS, per_param, strict=True)}
    for key, arr in expert_state_R.items():
        gpu[key] = gpu.get(key, np.zeros(n)) + np.asarray(arr, dtype=float)
    acts, in_flight = peak_activations_R(model, layout, stage, num_stages, micro_batches,
                                         tokens, rows_MLR, flash)
    gpu["activations"] = acts
    gpu.update(_buffers(model, layout, stage, num_stages, tokens, rows_MLR, dropped_MLR, zero))
    return StageMemory(stage=stage.index, ranks=stage.ranks, gpu=gpu, host=dict(host_R or {}),
                       in_flight=in_flight)


def _buffers(model: ModelSpec, layout: ParallelLayout, stage: Stage, num_stages: int,
             tokens: float, rows_MLR: np.ndarray, dropped_MLR: np.ndarray | None,
             zero: int) -> dict[str, np.ndarray]:
    n, split = stage.num_ranks, layout_split(layout)
    tok_b = model.hidden_size * model.bytes_activation
    local = tokens / (split.seq_split * layout.cp)
    out = {k: np.zeros(n) for k in BUFFER_KEYS}
    if rows_MLR.size:
        dropped = 0.0 if dropped_MLR is None else np.asarray(dropped_MLR, dtype=float).reshape(
            rows_MLR.shape)
        out["a2a_buffers"] = (local * model.top_k - dropped + rows_MLR).max(axis=(0, 1)) * tok_b
    if layout.tp > 1:
        out["tp_buffers"][:] = tokens / layout.cp * tok_b
    if layout.pp > 1:
        out["pp_buffers"][:] = 2 * local * tok_b
    if zero == 3:
        units = [model.dense_layer_params if layer < stage.num_dense_layers
                 else model.dense_params for layer in stage.layers]
        out["param_gather"][:] = ml.zero3_gather_bytes([u / layout.tp for u in units],
                                                       model.bytes_weight)
    return out


def expert_state_from_footprint(gpu: dict[str, np.ndarray], model: ModelSpec,
                                world: int) -> dict[str, np.ndarray]:
    """A policy's ``memory_footprint`` GPU part less the dense part every policy adds (weights
    and grads of ``num_layers · dense_params`` on each rank, their optimizer state ZeRO-1 over
    ``world``: ``policies.primitives.dense_params_R``): the experts' own state per rank.
    ``model`` and ``world`` are what the policy was given (the stage's MoE layers and ranks)."""
    dense = model.num_layers * model.dense_params
    strip = {"weights": dense * model.bytes_weight, "grads": dense * model.bytes_grad,
             "optimizer": dense / world * model.bytes_optim}
    out = {}
    for key, arr in gpu.items():
        rest = np.asarray(arr, dtype=float) - strip.get(key, 0.0)
        assert (rest > -1e-6 * max(1.0, strip.get(key, 0.0))).all(), (key, rest.min())
        out[key] = np.maximum(rest, 0.0)
    return out


def expert_state_zero(expert_params_R: np.ndarray, model: ModelSpec, zero: int,
                      edp: int, num_layers: int | None = None) -> dict[str, np.ndarray]:
    """Expert state per rank under ZeRO ``zero`` over the expert-data-parallel group of size
    ``edp`` (:func:`~moesim.memory_layout.state_bytes_per_param`); ``expert_params_R`` are the
    expert parameters resident per rank (slots × params per expert / etp) over ``num_layers``
    MoE layers (None: ``model.num_layers``). ZeRO-3 adds ``expert_gather``: the gathered
    experts of the layer computing and the one prefetched (two layers' worth of the rank's
    experts, as :func:`~moesim.memory_layout.zero3_gather_bytes` for the dense part)."""
    per_param = ml.state_bytes_per_param(zero, model.bytes_weight, model.bytes_grad,
                                         model.bytes_optim, edp)
    params = np.asarray(expert_params_R, dtype=float)
    out = {k: params * b for k, b in zip(STATE_KEYS, per_param, strict=True)}
    if zero == 3:
        layers = model.num_layers if num_layers is None else num_layers
        out["expert_gather"] = params * min(2, layers) / max(layers, 1) * model.bytes_weight
    return out


def stage_memory_table(stages: list[StageMemory], gpu_memory_bytes: float | None = None) -> str:
    """A text table, one row per stage, of its peak rank's components (GiB), ending with the
    stage and rank that peak overall and whether that fits ``gpu_memory_bytes``."""
    gib = float(2**30)
    head = ["stage", "ranks", "peak rank", "weights", "grads", "optimizer", "activations",
            "buffers", "total GiB", "in flight"]
    rows = []
    for sm in stages:
        i = int(np.argmax(sm.total_R))
        comp = {k: float(np.asarray(v)[i]) for k, v in sm.gpu.items()}
        buffers = sum(v for k, v in comp.items() if k not in (*STATE_KEYS, "activations"))
        rows.append([str(sm.stage), f"{int(sm.ranks[0])}-{int(sm.ranks[-1])}",
                     str(sm.peak_rank), *(f"{comp.get(k, 0.0) / gib:.2f}" for k in STATE_KEYS),
                     f"{comp.get('activations', 0.0) / gib:.2f}", f"{buffers / gib:.2f}",
                     f"{sm.total_R[i] / gib:.2f}", f"{sm.in_flight:g}"])
    widths = [max(len(r[j]) for r in [head, *rows]) for j in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True))
             for r in [head, *rows]]
    top = max(stages, key=lambda sm: float(sm.total_R.max()))
    peak = float(top.total_R.max())
    tail = f"peak: stage {top.stage}, rank {top.peak_rank}: {peak / gib:.2f} GiB"
    if gpu_memory_bytes:
        fits = "fits" if peak <= gpu_memory_bytes else "OUT OF MEMORY"
        tail += f" of {gpu_memory_bytes / gib:.2f} GiB ({fits})"
    return "\n".join([*lines, tail])
