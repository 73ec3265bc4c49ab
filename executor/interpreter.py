"""Walk one iteration's :class:`~moesim.ops.Program` on this rank with real tensors, timing each op.

Each rank runs the ops it takes part in, in program order (a valid execution order), one at a
time — except that on CPU the collectives of the ``prefetch`` stream (FSEP / Hecate / FasterMoE
weight gathers) are issued asynchronously and overlap the compute after them, joined through
``deps`` and the stream's FIFO order (on CUDA every op runs in order on the current stream; NCCL
orders the collectives). What each op does:

- ``Compute(kind="expert_ffn", phase="expert")`` — the expert FFN of every local slot on exactly
  its tokens (forward, or dgrad + wgrad backward), see :mod:`moesim.executor.moe_layer`;
- ``AllToAll`` of phase ``dispatch`` / ``combine`` with a forced route — the real token
  all-to-alls (``dist.all_to_all_single`` with split sizes); any other ``AllToAll`` moves a
  buffer of its ``bytes_RR``;
- ``Compute(phase="optimizer")`` — Adam on this rank's slot parameters (real tensors);
- other ``Compute`` (attention, router, dense) — a documented stand-in, since the MoE layer is
  the object of study: real GEMM work of the op's FLOPs, as expert-shaped FFN forwards done the
  way an expert slot does them (row gather, FFN, row scatter) on equal blocks of at most
  ``m`` = tokens-per-rank rows (the GEMM shape the cost model assumes for dense work);
  ``moesim calibrate`` times this stand-in and writes the profile's ``dense_gemm_eff_curve``,
  so the simulator prices exactly this workload;
- ``AllReduce / AllGather / ReduceScatter / Broadcast / Reduce`` — over each op group's process
  group, moving the expert tensors named by ``experts_G`` (parameters; gradients in phase
  ``grad_sync``), or a buffer of ``bytes_G`` for dense (``-1``) or unnamed groups;
- ``SendRecv`` — ``dist.batch_isend_irecv`` of the named experts' parameters (or buffers);
- ``HostCompute`` — a real Adam step on CPU over ``bytes_R / bytes_optim`` parameters;
- ``HostCopy`` — a real copy of ``bytes_R`` bytes between device and host memory (on CPU ranks:
  memory to memory).

Under a non-default layout (``RankExecutor(..., layout=...)``) nothing above is a stand-in:
:class:`~moesim.executor.dataflow.LayoutFlow` runs the real residual stream through the
attention, router, TP/SP collectives, pipeline sends, recompute and dense gradient / ZeRO ops
(each rank's route row is its index in its pipeline stage), and the program is refused in one
line when it has an op the dataflow cannot run. Per-op timing is the same either way.

The optimizer ``Compute`` updates ``bytes_R / (2·bytes_optim + bytes_grad + bytes_weight)``
parameters (the lowering's Adam traffic per parameter): this rank's expert slot parameters first
(real tensors and their gradients), then its dense-parameter shard (a stand-in buffer under the
default layout; the real attention weights, or their ZeRO chunk, under a layout).

Replay mode keeps the learning rate at 0: the optimizer does all its arithmetic but weights stay
the deterministic per-(layer, expert) values, so every replica always equals the reference and
every iteration is checkable. A collective's sizes are element counts of the model's dtype
(``bytes / bytes_per_element``), so the executor moves what the program says.

Shape legend: ``L`` MoE layers (index ``L`` = per-iteration ops), ``F`` phases, ``S`` local
slots, ``R`` ranks.

One small ``compile`` method per op type resolves sizes and tensors once and returns the work:
compute, host and set-up here, the communication ops in :mod:`moesim.executor.interpreter_comm`
(a mixin), the layout dataflow in :mod:`moesim.executor.dataflow`.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from moesim.executor import moe_etp
from moesim.executor import moe_layer as ml
from moesim.executor.dataflow import LayoutFlow
from moesim.executor.flow_state import held_layers
from moesim.executor.groups import GroupCache
from moesim.executor.interpreter_comm import CommOps
from moesim.executor.interpreter_host import HostOps
from moesim.executor.optim import HOST_ADAM_CHUNK, Adam
from moesim.executor.replay import (
    expert_weights,
    ffn_backward,
    ffn_forward,
    layer_inputs,
    torch_dtype,
)
from moesim.executor.timing import Collective, InFlight, OpTimes, Timer
from moesim.layout import ParallelLayout
from moesim.ops import (
    AllToAll,
    Compute,
    GroupCollective,
    HostCompute,
    HostCopy,
    Op,
    Program,
    SendRecv,
)
from moesim.specs import ModelSpec

# streams whose collectives are issued asynchronously on CPU (joined by deps and stream FIFO)
ASYNC_STREAMS = ("prefetch", "p2p", "p2p_odd", "p2p_wrap")



class RankExecutor(CommOps, HostOps):
    """One rank's interpreter; keeps slot weights, groups and buffers across iterations."""

    def __init__(self, model: ModelSpec, rank: int, world_size: int, device: torch.device,
                 lr: float = 0.0, layout: ParallelLayout | None = None) -> None:
        self.model, self.rank, self.world, self.device = model, rank, world_size, device
        self.dtype = torch_dtype(model)
        self.groups = GroupCache(world_size)
        self.slots: dict[int, list[tuple[int, torch.Tensor]]] = {}   # layer → [(expert, flat)]
        self.prev_slots: dict[int, list[tuple[int, torch.Tensor]]] = {}
        self.masters: dict[tuple[int, int], torch.Tensor] = {}
        self.slot_grads: dict[int, list[torch.Tensor]] = {}
        self.expert_grads: dict[tuple[int, int], torch.Tensor] = {}
        self.passes: dict[tuple[int, int], ml.LayerPass] = {}
        self.adam = Adam(lr)
        self.host_adam = Adam(lr, chunk=HOST_ADAM_CHUNK)
        self._buffers: dict[tuple, torch.Tensor] = {}
        # see _warm_expert_shapes: CUDA only (CPU kernels need no loading)
        self.warm_kernels = device.type == "cuda"
        self._warm_m: set[int] = set()
        self._warm_grad: torch.Tensor | None = None
        # under a non-default layout the dense ops run the real dataflow (executor/dataflow.py)
        self.flow = None if layout is None or layout.is_default else LayoutFlow(self, layout)
        # under expert TP each slot holds one 1/etp shard of its expert (executor/moe_etp.py)
        self.etp = 1 if layout is None else layout.etp
        self.expert_model = moe_etp.shard_model(model, self.etp)

    # -- set-up (untimed) -----------------------------------------------------------------
    def prepare(self, program: Program, iteration: int) -> None:
        """Install this iteration's slots, zero grads, build forced layer inputs, make groups."""
        self.groups.ensure(program)
        held = None if self.flow is None else held_layers(program, self.rank)
        routes = {k: r for k, r in program.routes.items() if held is None or k[1] in held}
        layouts = {l: r.phy2log_P for (_, l), r in sorted(routes.items())}
        for l, phy2log in layouts.items():
            self._install_slots(l, np.asarray(phy2log), routes)
        self.expert_grads = {}
        self.passes = {}
        self._make_masters(program)
        src, off = self._source()
        for (mb, l), route in sorted(routes.items()):
            row = moe_etp.route_row(route, src)
            inp = layer_inputs(route, row, self.model, iteration, mb, l, self.dtype)
            inp.x_NH, inp.grad_out_NH = inp.x_NH.to(self.device), inp.grad_out_NH.to(self.device)
            inp.gate_A = inp.gate_A.to(self.device)
            # route rows of the all-to-all's members, in its process group's rank order
            members = [moe_etp.route_row(route, m - off)
                       for m in sorted(self._a2a_members(program, mb, l))]
            etp_group = None
            if self.etp > 1:
                group = moe_etp.etp_group_of(src, self.etp)
                moe_etp.check_same_experts(route, group)
                etp_group = [moe_etp.route_row(route, r) for r in group]
            self.passes[(mb, l)] = ml.plan_pass(inp, route, row, members, self.device,
                                                etp_group)
        if self.flow is not None:
            self.flow.prepare(program, iteration, sorted(layouts))
            self.flow.check_program(program)
        if self.warm_kernels:
            self._warm_expert_shapes()

    def _source(self) -> tuple[int, int]:
        """``(route row, first world rank of the stage)``: a route's rows are its stage's
        ranks in order (the world's ranks without pipeline stages)."""
        if self.flow is None:
            return self.rank, 0
        return self.flow.source, self.flow.first_rank

    def _warm_expert_shapes(self) -> None:
        """Run each expert FFN row count this iteration brings for the first time once,
        forward and backward, on scratch data (untimed). CUDA loads a kernel on its first use
        (lazy module loading) and cuBLAS picks kernels by shape, so a replay, whose routing
        gives slots new row counts every iteration, would otherwise time one-off loads that a
        long training job has long paid: measured on an H100 (small-gpu), a layer-pass's
        expert op with five new row counts took 30 + 33 ms (forward + backward) the first time
        and 4 + 10 ms after; the real-trace replays ran 1.2-2.6x the prediction."""
        _, flat = next(sl[0] for sl in self.slots.values() if sl)
        for lp in self.passes.values():
            for rows in lp.slot_rows:
                m = len(rows)
                if m == 0 or m in self._warm_m:
                    continue
                if self._warm_grad is None:
                    self._warm_grad = torch.zeros_like(flat)
                x = torch.randn(m, self.model.hidden_size, device=self.device, dtype=self.dtype)
                y, saved = ffn_forward(x, flat, self.expert_model)
                ffn_backward(torch.randn_like(y), saved, flat, self._warm_grad,
                             self.expert_model)
                self._warm_m.add(m)

    def _install_slots(self, layer: int, phy2log_P: np.ndarray, routes: dict) -> None:
        """This iteration's slots of ``layer``: a slot keeps its tensor when its expert stays
        on this rank, else gets the expert's deterministic weights (the relayout ops then move
        the same values for real). The previous slots stay readable as relayout sources."""
        route = next(r for (_, l), r in routes.items() if l == layer)
        S, src = route.slots_per_rank, self._source()[0]
        row = moe_etp.route_row(route, src)
        mine = phy2log_P[row * S:(row + 1) * S]
        self.prev_slots[layer] = list(self.slots.get(layer, []))
        old = {e: t for e, t in self.slots.get(layer, [])}
        slots = []
        for e in mine.tolist():
            t = old.pop(e, None) if e >= 0 else None
            if t is None:
                t = (moe_etp.shard_expert(expert_weights(self.model, layer, e), self.model,
                                          src % self.etp, self.etp) if e >= 0
                     else torch.zeros(self.expert_model.params_per_expert))
                t = t.to(device=self.device, dtype=self.dtype)
            slots.append((int(e), t))
        self.slots[layer] = slots
        self.slot_grads[layer] = [torch.zeros_like(t) for _, t in slots]

    def _make_masters(self, program: Program) -> None:
        """Master copies of the experts this rank sends without holding them (e.g. from an
        optimizer shard's home), created before the timed walk."""
        for op in program.ops:
            if op.phase == "grad_sync" or op.layer < 0 or not self._takes_part(op):
                continue
            if isinstance(op, SendRecv) and op.experts_N is not None:
                mine = np.asarray(op.src_N) == self.rank
                experts = np.asarray(op.experts_N)[mine]
            elif isinstance(op, GroupCollective) and op.experts_G is not None:
                experts = np.asarray(op.experts_G)
            else:
                continue
            held = {e for e, _ in self.slots.get(op.layer, [])}
            held |= {e for e, _ in self.prev_slots.get(op.layer, [])}
            for e in set(experts.tolist()) - held:
                if e >= 0 and (op.layer, e) not in self.masters:
                    self.masters[(op.layer, e)] = expert_weights(self.model, op.layer, e).to(
                        device=self.device, dtype=self.dtype)

    def _a2a_members(self, program: Program, mb: int, layer: int) -> list[int]:
        for op in program.ops:
            if isinstance(op, AllToAll) and op.micro_batch == mb and op.layer == layer \
                    and op.phase == "dispatch" and op.ranks is not None:
                return [int(r) for r in np.asarray(op.ranks)]
        return list(range(self.world))

    # -- the timed walk ---------------------------------------------------------------------
    def run(self, program: Program, progress: Callable[[], None] | None = None) -> OpTimes:
        """Execute ``program`` after a barrier; returns this rank's op times. ``progress``
        (cheap, e.g. a heartbeat) is called after every op.

        On CPU, collectives on the ``prefetch`` stream are issued asynchronously (gloo runs them
        on its own threads) and overlap the compute that follows, as the stream semantics say;
        a later op waits for them only through its ``deps`` or the stream's FIFO order. Their
        end is recorded when they complete. Everything else runs in program order."""
        work = [(i, op, self.compile(op)) for i, op in enumerate(program.ops)
                if self._takes_part(op)]
        overlap = self.device.type == "cpu"
        timer = Timer(self.device)
        pending: dict[int, InFlight] = {}
        dist.barrier()
        timer.begin()
        for i, op, fn in work:
            self._wait_for(op, pending, timer)
            if overlap and op.stream in ASYNC_STREAMS and isinstance(fn, Collective):
                pending[i] = InFlight(i, fn.start, op.stream)
            else:
                timer.mark_start(i)
                fn()
                timer.mark_end(i)
            if progress is not None:
                progress()
        for i in list(pending):
            timer.add(*pending.pop(i).join())
        return OpTimes(events=timer.finish(), origin_s=timer.origin_s,
                       clock="cuda" if timer.cuda else "monotonic", host=socket.gethostname())

    @staticmethod
    def _wait_for(op: Op, pending: dict[int, InFlight], timer: Timer) -> None:
        """Join in-flight ops ``op`` depends on (its deps; the prefetch stream's FIFO)."""
        waits = [d for d in op.deps if d in pending]
        waits += [d for d, f in pending.items() if f.stream == op.stream]
        for d in dict.fromkeys(waits):
            timer.add(*pending.pop(d).join())

    def _takes_part(self, op: Op) -> bool:
        if isinstance(op, (Compute, HostCompute, HostCopy, AllToAll)):
            return op.ranks is None or self.rank in np.asarray(op.ranks)
        if isinstance(op, GroupCollective):
            return any(self.rank in np.asarray(g) for g in op.groups)
        if isinstance(op, SendRecv):
            return self.rank in np.asarray(op.src_N) or self.rank in np.asarray(op.dst_N)
        return False

    def _mine(self, op: Op, arr_R: np.ndarray) -> float:
        """This rank's entry of a per-rank array: indexed by world rank, or (a pipeline
        stage's op, see :meth:`moesim.stage_context.StageView._translate`) by position in
        the op's ``ranks``."""
        arr = np.asarray(arr_R)
        if len(arr) == self.world or op.ranks is None:
            return arr[self.rank]
        return arr[np.asarray(op.ranks).tolist().index(self.rank)]

    def execute(self, op: Op) -> None:
        """Run one op on this rank (it takes part in it)."""
        self.compile(op)()

    def compile(self, op: Op) -> Callable[[], None]:
        """Resolve everything about ``op`` that does not depend on data (sizes, groups,
        buffers) and return the work itself, so the timed walk runs only the work."""
        if self.flow is not None:
            fn = self.flow.compile(op)
            if fn is not None:
                return fn
        if isinstance(op, Compute):
            return self._compute(op)
        if isinstance(op, HostCompute):
            return self._host_adam(float(self._mine(op, op.bytes_R)))
        if isinstance(op, HostCopy):
            return self._host_copy(int(self._mine(op, op.bytes_R)), op.to_host)
        if isinstance(op, AllToAll):
            return self._all_to_all(op)  # token all-to-alls run synchronously
        if isinstance(op, (GroupCollective, SendRecv)):
            return Collective(self._group_collective(op) if isinstance(op, GroupCollective)
                               else self._send_recv(op))
        raise TypeError(f"executor cannot run {type(op).__name__}")  # pragma: no cover

    # -- compute ----------------------------------------------------------------------------
    def _compute(self, op: Compute) -> Callable[[], None]:
        lp = self.passes.get((op.micro_batch, op.layer))
        if op.phase == "expert" and op.kind == "expert_ffn" and lp is not None:
            params = [t for _, t in self.slots[op.layer]]
            if op.direction == "fwd":
                return lambda: ml.expert_fwd(lp, params, self.expert_model)
            grads = self.slot_grads[op.layer]
            return lambda: ml.expert_bwd(lp, params, grads, self.expert_model)
        if op.phase == "optimizer":
            m = self.model
            per_param = 2 * m.bytes_optim + m.bytes_grad + m.bytes_weight
            numel = int(float(self._mine(op, op.bytes_R)) / per_param)
            return lambda: self._optimizer_step(numel)
        return self._standin(float(self._mine(op, op.flops_R)))

    def _standin(self, flops: float) -> Callable[[], None]:
        """Stand-in compute of ``flops`` (see the module docstring): expert-shaped FFN forwards
        over ``ceil(rows / m)`` equal blocks of rows (``m`` = tokens per rank, the GEMM shape
        the cost model assumes for dense work), each gathered, run and scattered as an expert
        slot's rows are; work smaller than one FFN row-block (the router) is one
        ``[m, H] @ [H, n]`` matmul."""
        m, h = max(1, self.model.tokens_per_rank), self.model.hidden_size
        x = self._buffer(("mm_x", m), (m, h), randn=True)
        if flops <= 0:
            return lambda: None
        if flops < m * self.model.expert_flops_per_token:
            n = max(1, round(flops / (2.0 * m * h)))
            b, out = self._buffer(("mm_b", n), (h, n), randn=True), self._buffer(("mm_c", n),
                                                                                 (m, n))
            return lambda: torch.matmul(x, b, out=out)
        w = self._buffer(("mm_w",), (self.model.params_per_expert,), randn=True)
        y = self._buffer(("mm_y", m), (m, h))
        rows = int(round(flops / self.model.expert_flops_per_token))
        blocks = -(-rows // m)
        sizes = [rows // blocks + (1 if b < rows % blocks else 0) for b in range(blocks)]
        idx = [torch.arange(k, device=self.device) for k in sorted(set(sizes))]
        picks = [idx[sorted(set(sizes)).index(k)] for k in sizes]

        def work() -> None:
            for rows_b in picks:
                yb, _ = ffn_forward(x.index_select(0, rows_b), w, self.model)
                y.index_copy_(0, rows_b, yb)
        return work
