"""Which parallel layouts the executor runs, decided once, before any rank starts.

The executor may not silently skip an op of a program: it runs every op with real tensors or
refuses the whole program. :func:`check_layout` is that gate; ``moesim run``, ``moesim
validate`` and each rank of ``moesim.executor.worker`` call it with the ``--parallel`` text.
Today it accepts the default layout only; each layout feature the executor learns to run is
removed from :data:`UNSUPPORTED` here, with the test that checks it against the reference.
"""

from __future__ import annotations

from moesim.errors import MoesimError
from moesim.layout import ParallelLayout, parse_layout

# (feature, predicate on the layout): layouts the executor refuses, with the reason's name
UNSUPPORTED: tuple[tuple[str, object], ...] = (
    ("tensor parallelism (tp > 1)", lambda lay: lay.tp > 1),
    ("pipeline parallelism (pp > 1)", lambda lay: lay.pp > 1),
    ("context parallelism (cp > 1)", lambda lay: lay.cp > 1),
    ("expert tensor parallelism (etp > 1)", lambda lay: lay.etp > 1),
    ("activation recomputation", lambda lay: lay.recompute != "none"),
    ("a ZeRO stage", lambda lay: lay.zero is not None),
    ("the all-to-all overlap", lambda lay: lay.a2a_overlap),
    ("a non-default layout", lambda lay: not lay.is_default),
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
