"""Which parallel layouts the executor runs, decided once, before any rank starts.

The executor may not silently skip an op of a program: it runs every op with real tensors or
refuses the whole program. :func:`check_layout` is that gate; ``moesim run``, ``moesim
validate`` and each rank of ``moesim.executor.worker`` call it with the ``--parallel`` text.
Each layout feature the executor runs is absent from :data:`UNSUPPORTED`, with the test that
checks it against the whole-stack reference (:mod:`moesim.executor.layout_reference`); a
model or an op the dataflow cannot run is refused when the program is prepared
(:meth:`moesim.executor.dataflow.LayoutFlow.check_program`).
"""

from __future__ import annotations

from moesim.errors import MoesimError
from moesim.layout import ParallelLayout, parse_layout

# (feature, predicate on the layout): layouts the executor refuses, with the reason's name.
# Everything else runs for real under the layout dataflow (executor/dataflow.py) and is checked
# against the whole-stack reference (tests/executor/test_layouts_gloo.py): TP with SP, PP
# (1f1b, interleaved, gpipe; with the all-to-all overlap's fused steps), full and selective
# (core_attn, moe, moe_act) recomputation, ZeRO 0-3, expert TP (etp > 1, static EP;
# executor/moe_etp.py) with any of these.
_RUNS_SELECTIVE = ("core_attn", "moe", "moe_act")
UNSUPPORTED: tuple[tuple[str, object], ...] = (
    ("tensor parallelism without sequence parallelism (tp > 1 needs sp=true: the MoE "
     "layer routes each rank's own sequence shard)", lambda lay: lay.tp > 1 and not lay.sp),
    ("context parallelism (cp > 1: no ring attention in the executor)", lambda lay: lay.cp > 1),
    ("selective recomputation of modules other than core_attn, moe and moe_act (the "
     "executor's model has no affine LayerNorm, no dense MLP layers and no MLA)",
     lambda lay: lay.recompute == "selective"
     and not set(lay.recompute_modules) <= set(_RUNS_SELECTIVE)),
)


def unsupported(layout: ParallelLayout) -> str | None:
    """The first feature of ``layout`` the executor cannot run, or None."""
    for name, pred in UNSUPPORTED:
        if pred(layout):
            return name
    return None


def check_layout(text: str | None) -> ParallelLayout:
    """Parse ``--parallel`` and refuse, in one line, a layout the executor cannot run."""
    layout = parse_layout(text)
    what = unsupported(layout)
    if what is not None:
        raise MoesimError(f"the executor does not run {what} yet (got --parallel {text}: "
                          f"{layout.describe()}); simulate it with moesim simulate "
                          f"--parallel {text}, or run without --parallel")
    return layout
