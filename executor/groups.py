"""Process groups: one per distinct rank set a program names, created once and cached.

``dist.new_group`` is a collective over the whole world: every rank must call it for every group,
in the same order. :func:`program_groups` derives that order from the program alone (first
appearance in program order, then the rank tuple), and every rank holds the same program, so the
calls line up. Groups are cached across iterations; only groups new to this process are created.
"""

from __future__ import annotations

import numpy as np
import torch.distributed as dist

from moesim.ops import AllToAll, GroupCollective, Program


def program_groups(program: Program) -> list[tuple[int, ...]]:
    """The distinct rank sets (size ≥ 2, not the whole world) that ``program``'s ops use, in
    first-use order."""
    seen: dict[tuple[int, ...], None] = {}
    world = tuple(range(program.num_ranks))
    for op in program.ops:
        if isinstance(op, GroupCollective):
            sets = [tuple(sorted(int(r) for r in g)) for g in op.groups]
        elif isinstance(op, AllToAll) and op.ranks is not None:
            sets = [tuple(sorted(int(r) for r in np.asarray(op.ranks)))]
        else:
            continue
        for s in sets:
            if len(s) >= 2 and s != world:
                seen.setdefault(s, None)
    return list(seen)


#: the "group" of one rank (a pipeline stage of one rank): its collectives are local copies
SELF = "self"


class GroupCache:
    """Maps a rank tuple to its process group (the default group for the whole world)."""

    def __init__(self, world_size: int) -> None:
        self.world = tuple(range(world_size))
        self._groups: dict[tuple[int, ...], object] = {}

    def ensure(self, program: Program) -> int:
        """Create the groups ``program`` needs that do not exist yet (collective over all
        ranks); returns how many were created."""
        new = [g for g in program_groups(program) if g not in self._groups]
        for g in new:
            self._groups[g] = dist.new_group(list(g))
        return len(new)

    def get(self, ranks: tuple[int, ...]) -> object | None:
        """The group of ``ranks`` (sorted tuple); ``None`` means the default (world) group."""
        if ranks == self.world:
            return None
        if len(ranks) == 1:
            return SELF
        return self._groups[ranks]
