"""Incremental re-balancing: from the placement in force, move the fewest replicas that bring
the GPU imbalance down to a target.

Asked of DeepSeek's EPLB (which re-plans from scratch, deepseek-ai/EPLB PR 13) and built in
vLLM's SwiftBalancer proposal (vLLM PRs 23243 / 24069 / 37656: "minimal, incremental
adjustments based on the current ... expert deployment"). The placement keeps every replica
that is not moved; one move re-purposes one slot:

- the hot GPU is the one with the highest load (each expert's load split evenly over its
  replicas); the candidate experts ``b`` to replicate are its two hottest by load per copy;
- the candidate slots are those of the four least-loaded GPUs that do not hold ``b``, holding an
  expert ``a`` with at least two replicas (or nothing);
- of all candidate moves ``a → b`` the one giving the lowest ``(max GPU load, Σ load²)``
  is applied, if it lowers that pair; the loop stops once ``max / mean ≤ target_imbalance``,
  when no candidate improves, or after ``max_moves``.

Each accepted move takes one replica (one expert's weights and optimizer share) over the
network, so the number of moves is the migration. The greedy best-improvement choice aims
at the fewest moves; it is not an exact minimum (that is an integer program).

Shape legend: ``E`` experts, ``G`` ranks, ``S`` slots per rank, ``P = G·S``.
"""

from __future__ import annotations

import numpy as np

HOT_EXPERTS = 2
COLD_GPUS = 4


def imbalance_ratio(gpu_load_G: np.ndarray) -> float:
    """``max / mean`` GPU load (1 when nothing is loaded)."""
    mean = float(gpu_load_G.mean())
    return float(gpu_load_G.max()) / mean if mean > 0 else 1.0


def incremental_path(phy2log_P: np.ndarray, load_E: np.ndarray, slots_per_rank: int,
                     target_imbalance: float, max_moves: int) -> list[np.ndarray]:
    """The placements after 0, 1, 2, ... accepted moves (the first is a copy of the input)."""
    row = np.asarray(phy2log_P, dtype=np.int64).copy()
    load = np.asarray(load_E, dtype=np.float64)
    S, E = slots_per_rank, load.shape[0]
    G = row.shape[0] // S
    rank_P = np.arange(row.shape[0]) // S
    on_GE = np.zeros((G, E), dtype=np.int64)
    filled = row >= 0
    np.add.at(on_GE, (rank_P[filled], row[filled]), 1)
    cnt = on_GE.sum(axis=0)
    gl = on_GE @ (load / np.maximum(cnt, 1))
    path = [row.copy()]
    for _ in range(max_moves):
        if imbalance_ratio(gl) <= target_imbalance:
            break
        move = _best_move(row, on_GE, cnt, load, load / np.maximum(cnt, 1), gl, S)
        if move is None:
            break
        p, b, gl = move
        a, r = int(row[p]), int(rank_P[p])
        if a >= 0:
            on_GE[r, a] -= 1
            cnt[a] -= 1
        on_GE[r, b] += 1
        cnt[b] += 1
        row[p] = b
        path.append(row.copy())
    return path


def _best_move(row: np.ndarray, on_GE: np.ndarray, cnt: np.ndarray, load: np.ndarray,
               pc: np.ndarray, gl: np.ndarray, S: int
               ) -> tuple[int, int, np.ndarray] | None:
    """``(slot, new expert, GPU loads after the move)`` of the best improving move, or
    None."""
    best, best_key = None, (float(gl.max()), float(gl @ gl))
    hot = int(np.argmax(gl))
    experts = np.flatnonzero(on_GE[hot])
    for b in experts[np.argsort(-pc[experts], kind="stable")][:HOT_EXPERTS].tolist():
        pc_b = load[b] / (cnt[b] + 1)
        base_b = gl + on_GE[:, b] * (pc_b - pc[b])
        without = np.flatnonzero(on_GE[:, b] == 0)
        for r in without[np.argsort(gl[without], kind="stable")][:COLD_GPUS].tolist():
            for p in range(r * S, (r + 1) * S):
                a = int(row[p])
                if a == b or (a >= 0 and cnt[a] < 2):
                    continue
                new = base_b.copy()
                new[r] += pc_b
                if a >= 0:
                    pc_a = load[a] / (cnt[a] - 1)
                    new += on_GE[:, a] * (pc_a - pc[a])
                    new[r] -= pc_a
                key = (float(new.max()), float(new @ new))
                if key < best_key:
                    best, best_key = (p, b, new), key
    return best
