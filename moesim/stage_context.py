"""What a lowering context knows about its pipeline stage and layout (a mixin of
:class:`~moesim.lowering.LoweringContext`).

A context lowers one stage: its ranks are ``0..n−1`` (``n`` ranks per stage), its MoE layers
``0..L_s−1``; :meth:`StageView.add` translates every op to world ranks and global MoE layer
numbers as it appends it (nothing to translate when the stage is the whole world, so a run
without pipeline parallelism builds exactly the ops it always did). The per-layer keyword sets
(:meth:`layer_kw` …) price a layer's compute under TP/SP/CP: per rank, attention FLOPs are
those of its ``T`` tokens (``T = s·b/(t·c)``), weights are read ``1/t`` each, and GEMM rows are
the TP region's ``T·t`` tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moesim.blockmatrix import BlockBatch, BlockDiag
from moesim.expert_tp import ExpertTPView
from moesim.layer_ops import attention_flops, dense_ffn_params, kv_elements, layer_dense_params
from moesim.layout import ParallelLayout
from moesim.ops import (
    AllToAll,
    Compute,
    GroupCollective,
    HostCompute,
    HostCopy,
    Op,
    ReduceScatter,
    SendRecv,
)

DEFAULT_LAYOUT = ParallelLayout()


def _replaced(op: Op, changes: dict[str, Any]) -> Op:
    """``dataclasses.replace(op, **changes)`` without re-running ``__init__`` (the op was
    validated when it was made; this is on the lowering's hot path)."""
    if not changes:
        return op
    new = object.__new__(type(op))
    new.__dict__.update(op.__dict__)
    new.__dict__.update(changes)
    return new


def _frozen(arr: np.ndarray) -> np.ndarray:
    arr.setflags(write=False)
    return arr


class StageView(ExpertTPView):
    """Layout and stage facts and helpers; the attributes are set by the lowering
    (:func:`moesim.layered.stage_contexts`): ``layout``, ``stage`` (None: one stage, the world),
    ``num_dense``, ``local_moe`` (transformer layer → local MoE index), ``rank_offset``,
    ``layer_ids`` (local MoE index → global, None: the same), ``first_stage`` / ``last_stage``."""

    layout: ParallelLayout = DEFAULT_LAYOUT
    stage: Any = None
    num_dense: int = 0
    rank_offset: int = 0
    layer_ids: np.ndarray | None = None
    first_stage: bool = True
    last_stage: bool = True
    last_op: int = -1

    # -- op translation ---------------------------------------------------------------------
    def add(self, op: Op) -> int:
        """Append ``op`` (stage ranks and layers) to the program; returns its index."""
        if self.rank_offset or self.layer_ids is not None or self.world != self.program.num_ranks:
            op = self._translate(op)
        self.last_op = self.program.add(op)
        return self.last_op

    def _translate(self, op: Op) -> Op:
        off, n = self.rank_offset, self.world
        ch: dict[str, Any] = {}
        if op.layer >= 0 and self.layer_ids is not None:
            ch["layer"] = int(self.layer_ids[op.layer])
        if isinstance(op, GroupCollective):
            ch["groups"] = self._shifted_groups(op.groups)
            if hasattr(op, "roots_G") and len(op.roots_G):
                ch["roots_G"] = np.asarray(op.roots_G, np.int64) + off
        elif isinstance(op, AllToAll):
            ch["ranks"] = self._stage_ranks() if op.ranks is None \
                else np.asarray(op.ranks) + off
        elif isinstance(op, SendRecv):
            ch["src_N"] = np.asarray(op.src_N, np.int64) + off
            ch["dst_N"] = np.asarray(op.dst_N, np.int64) + off
        elif isinstance(op, (Compute, HostCompute, HostCopy)):
            if op.ranks is None:
                ch["ranks"] = self._stage_ranks()
            else:  # per-rank arrays are indexed by stage rank: keep the named ranks' rows
                sub = np.asarray(op.ranks, np.int64)
                ch["ranks"] = sub + off
                for name in ("flops_R", "bytes_R", "gemm_tokens_RS"):
                    arr = getattr(op, name, None)
                    if arr is not None and np.ndim(arr) and len(arr) == n:
                        ch[name] = np.asarray(arr)[sub]
        return _replaced(op, ch)

    def _stage_ranks(self) -> np.ndarray:
        """The stage's world ranks, one read-only array shared by its ops (so the cost model
        and the engine can recognise ops over the same ranks)."""
        if "world_ranks" not in self._consts:
            self._consts["world_ranks"] = _frozen(np.arange(self.rank_offset,
                                                            self.rank_offset + self.world))
        return self._consts["world_ranks"]

    def _shifted_groups(self, groups: tuple) -> tuple[np.ndarray, ...]:
        """``groups`` in world ranks; one shifted tuple per groups object this iteration
        (the cached TP / DP groups are shared by many ops)."""
        key = ("shifted", id(groups))
        hit = self._iter.get(key)
        if hit is None or hit[0] is not groups:  # the entry keeps ``groups`` alive
            shifted = tuple(np.asarray(g, np.int64) + self.rank_offset for g in groups)
            hit = self._iter[key] = (groups, shifted)
        return hit[1]

    # -- sizes --------------------------------------------------------------------------------
    @property
    def plain(self) -> bool:
        """No TP and no CP: layers lower exactly as they did before layouts."""
        return self.layout.tp == 1 and self.layout.cp == 1

    def _groups(self, key: str, build) -> tuple[np.ndarray, ...]:
        if key not in self._consts:
            self._consts[key] = tuple(build())
        return self._consts[key]

    @property
    def tp_groups(self) -> tuple[np.ndarray, ...]:
        t = self.layout.tp
        return self._groups("tp_groups", lambda: (np.arange(g * t, (g + 1) * t)
                                                  for g in range(self.world // t)))

    @property
    def dp_groups(self) -> tuple[np.ndarray, ...]:
        """Ranks holding the same TP shard of the dense weights (DP × CP)."""
        t = self.layout.tp
        return self._groups("dp_groups", lambda: (np.arange(i, self.world, t)
                                                  for i in range(t)))

    @property
    def dp_size(self) -> int:
        return self.world // self.layout.tp

    @property
    def tp_bytes(self) -> float:
        """One TP collective's size: the TP region's activation, ``T·t·H`` elements."""
        m = self.model
        return m.tokens_per_rank * self.layout.tp * m.hidden_size * m.bytes_activation

    @property
    def cp_ring_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """``(src_N, dst_N)`` of one ring step: each rank to the next of its CP ring."""
        if "cp_pairs" not in self._consts:
            t, c = self.layout.tp, self.layout.cp
            src = np.arange(self.world)
            pos = (src // t) % c
            dst = src + t * (((pos + 1) % c) - pos)
            self._consts["cp_pairs"] = (src, dst)
        return self._consts["cp_pairs"]

    @property
    def cp_bytes(self) -> float:
        """Bytes a rank passes per forward ring step: its K and V chunk, ``T·t`` tokens."""
        m = self.model
        return m.tokens_per_rank * self.layout.tp * kv_elements(m) * m.bytes_activation

    # -- per-layer compute keyword sets --------------------------------------------------------
    def layer_kw(self) -> tuple[dict, dict]:
        """Keyword sets of an MoE layer's attention (``dense``) and router ops (forward)."""
        if "layer_kw" not in self._consts:
            m, T, t = self.model, self.model.tokens_per_rank, self.layout.tp
            act = T * m.hidden_size * m.bytes_activation
            dense = dict(kind="attention", gemm_rows=T * t,
                         flops_R=self.const_R(m.attention_flops_per_token * T),
                         bytes_R=self.const_R(m.dense_params * m.bytes_weight / t + 2 * act))
            if not self.layout.is_default:  # the whole block (the executor runs it for real)
                dense["block"] = "attention"
            route = dict(kind="router", gemm_rows=T,
                         flops_R=self.const_R(2.0 * m.hidden_size * m.num_experts * T),
                         bytes_R=self.const_R(m.hidden_size * m.num_experts * m.bytes_weight
                                              + act))
            self._consts["layer_kw"] = (dense, route)
        return self._consts["layer_kw"]

    def backward_kw(self) -> dict:
        """An MoE layer's attention backward (2× the forward FLOPs and bytes of attention and
        router; the router's backward folded in)."""
        if "backward_kw" not in self._consts:
            dense, route = self.layer_kw()
            self._consts["backward_kw"] = dict(
                dense, flops_R=_frozen(2 * (dense["flops_R"] + route["flops_R"])),
                bytes_R=_frozen(2 * (dense["bytes_R"] + route["bytes_R"])))
        return self._consts["backward_kw"]

    def dense_layer_kw(self, backward: bool = False) -> tuple[dict, dict]:
        """A dense transformer layer's attention and FFN keyword sets (backward: 2×)."""
        key = ("dense_layer_kw", backward)
        if key not in self._consts:
            m, T, t = self.model, self.model.tokens_per_rank, self.layout.tp
            f = 2.0 if backward else 1.0
            act = T * m.hidden_size * m.bytes_activation
            ffn = dense_ffn_params(m)
            attn_p = m.dense_layer_params - ffn
            self._consts[key] = tuple(
                dict(kind=kind, gemm_rows=T * t, flops_R=self.const_R(f * flops * T),
                     bytes_R=self.const_R(f * (params * m.bytes_weight / t + 2 * act)))
                for kind, flops, params in (("attention", attention_flops(m), attn_p),
                                            ("other", 2.0 * ffn, ffn)))
        return self._consts[key]

    def bytes_MLRG(self, mb: int, layer: int) -> BlockDiag:
        """Dispatch bytes ``[R, G]`` of one layer-pass, held as its routed tokens' blocks
        times the token bytes (:class:`~moesim.blockmatrix.BlockDiag`; one block without
        block routing); combine uses its transpose: the cost model then costs the shared
        buffer once."""
        key = ("bytes", mb, layer)
        cache = self._iter  # this iteration's tokens: not the per-decision cache
        if key not in cache:
            cache[key] = BlockDiag(self.tokens_MLRG[mb, layer], self.token_bytes_scale,
                                   self.block or None, batch=(self.token_batch(), (mb, layer)))
        return cache[key]

    @property
    def token_bytes_scale(self) -> int | float:
        """Bytes per routed token, an int where it is whole (int64 bytes: exact, fast)."""
        tb = self.model.token_bytes
        return int(tb) if float(tb).is_integer() else float(tb)

    def token_batch(self) -> BlockBatch:
        """This iteration's routed tokens as one :class:`~moesim.blockmatrix.BlockBatch`
        (its column sums: the tokens each rank's slots receive), which every dispatch and
        combine matrix of :meth:`bytes_MLRG` points back to."""
        if "token_batch" not in self._iter:
            M, L, R, _ = self.tokens_MLRG.shape
            recv_MLR = self.rows_MLP.reshape(M, L, R, -1).sum(axis=3)
            self._iter["token_batch"] = BlockBatch(self.tokens_MLRG, self.block or R, recv_MLR)
        return self._iter["token_batch"]

    def expert_op(self, mb: int, layer: int, direction: str, deps: tuple[int, ...],
                  label: str = "") -> Compute:
        """The expert FFN compute of one layer-pass: per-slot GEMM rows from the kept tokens
        (with ETP: :meth:`~moesim.expert_tp.ExpertTPView.etp_expert_op`)."""
        if self.layout.etp > 1:
            return self.etp_expert_op(mb, layer, direction, deps, label)
        m, S = self.model, self.placement.slots_per_rank
        rows_RS = self.rows_MLP[mb, layer].reshape(-1, S)
        passes = 1 if direction == "fwd" else 2
        active_R = (rows_RS > 0).sum(axis=1)
        return Compute(phase="expert", direction=direction, layer=layer, micro_batch=mb,
                       deps=deps, kind="expert_ffn", gemm_tokens_RS=rows_RS,
                       gemm_passes=passes, label=label,
                       flops_R=rows_RS.sum(axis=1) * (m.expert_flops_per_token * passes),
                       bytes_R=active_R * (m.expert_weight_bytes * passes),
                       weight_bytes=m.expert_weight_bytes,
                       flops_per_token=m.expert_flops_per_token)

    # -- recompute --------------------------------------------------------------------------
    def recomputes(self, tlayer: int) -> frozenset:
        """What is recomputed of transformer layer ``tlayer`` before its backward:
        ``{"full"}``, the selective modules, or nothing."""
        lay = self.layout
        if lay.recompute == "none":
            return frozenset()
        if lay.recompute == "selective":
            return frozenset(lay.recompute_modules)
        if lay.recompute_num_layers is None:
            return frozenset({"full"})
        chunk = next(c for c in self.stage_chunks if tlayer in c)
        return frozenset({"full"}) if chunk.index(tlayer) < lay.recompute_num_layers \
            else frozenset()

    def selective_kw(self, mb: int, layer: int, tlayer: int, modules: frozenset
                     ) -> list[tuple[str, dict]]:
        """Compute keyword sets of the selectively recomputed modules of one layer (``moe``
        and ``mlp`` are handled by the caller: they re-run whole blocks). ``core_attn``: the
        score and value products, ``4·s·H`` FLOPs per token; ``layernorm``: two norms'
        elementwise passes; ``moe_act``: the expert activation over each rank's routed rows;
        ``mla_up_proj``: MLA's query and key/value up-projections."""
        m, T = self.model, self.model.tokens_per_rank
        act = T * m.hidden_size * m.bytes_activation
        out = []
        if "core_attn" in modules:
            out.append(("core_attn", dict(kind="attention", gemm_rows=T * self.layout.tp,
                                          flops_R=self.const_R(4.0 * m.seq_len * m.hidden_size
                                                               * T),
                                          bytes_R=self.const_R(4 * act))))
        if "layernorm" in modules:
            out.append(("layernorm", dict(kind="other", flops_R=self.const_R(16.0 * T
                                                                             * m.hidden_size),
                                          bytes_R=self.const_R(4 * act))))
        if "mla_up_proj" in modules and m.is_mla:
            a = m.num_attention_heads
            up = (m.q_lora_rank or m.hidden_size) * a * (m.qk_nope_head_dim + m.qk_rope_head_dim) \
                + m.kv_lora_rank * a * (m.qk_nope_head_dim + m.v_head_dim)
            out.append(("mla_up_proj", dict(kind="attention", gemm_rows=T * self.layout.tp,
                                            flops_R=self.const_R(2.0 * up * T),
                                            bytes_R=self.const_R(up * m.bytes_weight
                                                                 / self.layout.tp + 2 * act))))
        if "moe_act" in modules and layer >= 0:
            rows_R = self.expert_rows_RS(mb, layer).sum(axis=1)  # ETP: 1/et of F each
            out.append(("moe_act", dict(kind="other", **self.moe_act_work(rows_R))))
        return out

    def moe_act_work(self, rows_R: np.ndarray) -> dict[str, np.ndarray]:
        """``flops_R`` and ``bytes_R`` of recomputing the expert activation (SwiGLU) over
        each rank's routed rows ``rows_R``."""
        m = self.model
        ffn = m.ffn_hidden_size / self.layout.etp if self.layout.etp > 1 else m.ffn_hidden_size
        per_row = (3 if m.gated else 2) * ffn * m.bytes_activation
        return {"flops_R": rows_R * 4.0 * ffn, "bytes_R": rows_R * per_row}

    # -- dense parameters under the layout ----------------------------------------------------
    def stage_dense_params(self) -> float:
        """Non-expert parameters this stage's ranks hold whole (before TP): the MoE layers'
        dense part, the dense layers, and the embedding / output head on the first / last
        stage (where the model gives its vocabulary)."""
        m = self.model
        total = len(self.local_moe) * m.dense_params
        dense_layers = sum(1 for tl in self.stage_layers if tl < self.num_dense)
        if dense_layers:
            total += dense_layers * m.dense_layer_params
        if m.vocab_size and self.layout.whole_model:
            total += (m.embedding_params if self.first_stage else 0.0) \
                + (m.output_head_params + m.final_norm_params if self.last_stage else 0.0)
        return total

    def dense_shard_params_R(self) -> np.ndarray:
        """Dense parameters whose optimizer state each rank updates: ``1/t`` of the stage's,
        sharded over DP × CP unless ``zero=0``."""
        shard = self.stage_dense_params() / self.layout.tp
        return np.full(self.world, shard if self.layout.zero == 0 else shard / self.dp_size)

    def head_kw(self, backward: bool = False) -> dict:
        """The output head's GEMM on the last stage (``H × vocab``, split over TP; backward
        2×), for models that give their vocabulary."""
        m, T, t = self.model, self.model.tokens_per_rank, self.layout.tp
        f = 2.0 if backward else 1.0
        params = m.hidden_size * m.vocab_size
        return dict(kind="other", gemm_rows=T * t, label="output_head",
                    flops_R=self.const_R(f * 2.0 * params * T),
                    bytes_R=self.const_R(f * params * m.bytes_weight / t))

    def emit_dense_optimizer(self) -> list[int]:
        """Adam over this rank's dense shard and the all-gather of updated dense weights (a
        stage without MoE layers: nothing of the policy's runs there)."""
        m = self.model
        params_R = self.dense_shard_params_R()
        per_param = 2 * m.bytes_optim + m.bytes_grad + m.bytes_weight
        step = self.add(Compute(phase="optimizer", direction="step", kind="other",
                                deps=self.optimizer_deps(), flops_R=params_R * 10.0,
                                bytes_R=params_R * per_param, label="adam_dense"))
        return [step] + self.emit_dense_param_allgather((step,))

    def zero3_grad_scatter(self, layer: int, tlayer: int, deps: tuple[int, ...]) -> list[int]:
        """ZeRO-3: reduce-scatter one layer's dense gradients over DP after its last backward."""
        if self.layout.zero != 3 or self.dp_size < 2:
            return []
        nbytes = layer_dense_params(self.model, tlayer, self.num_dense) / self.layout.tp \
            * self.model.bytes_grad
        return [self.add(ReduceScatter(phase="grad_sync", direction="bwd", layer=layer,
                                       deps=deps, groups=self.dp_groups,
                                       bytes_G=np.full(len(self.dp_groups), nbytes),
                                       label="zero3_grads"))]

    @property
    def stage_layers(self) -> tuple[int, ...]:
        return tuple(tl for c in self.stage_chunks for tl in c)

    @property
    def stage_chunks(self) -> tuple[tuple[int, ...], ...]:
        if self.stage is not None:
            return self.stage.chunks
        return (tuple(range(self.num_dense + self.model.num_layers)),)

    @property
    def local_moe(self) -> dict[int, int]:
        """Transformer layer → this stage's MoE layer index."""
        if "local_moe" not in self._consts:
            moe = [tl for tl in self.stage_layers if tl >= self.num_dense]
            self._consts["local_moe"] = {tl: i for i, tl in enumerate(moe)}
        return self._consts["local_moe"]
