"""The GPU load a policy produces: tokens each GPU computed, per MoE layer (``rank_tokens`` of a
RunResult, after drops), averaged over the run's iterations, relative to the mean GPU.

The expert-load heatmap shows the trace, which no policy changes (one per report); this one
shows what the policy did with it: a balanced policy is a flat field at 1, contiguous expert
parallelism a few hot GPUs per layer.
"""

from __future__ import annotations

import os

import numpy as np

from .figio import mark_incomplete, new_figure, save_figure
from .runs import RunLike, as_run, require, run_label, titled


def gpu_load_LR(run) -> np.ndarray:
    """Mean tokens per GPU per layer over the run's iterations, over the layer's mean GPU:
    ``[L, R]`` (1 = balanced)."""
    tok_ILR = run["rank_tokens"].astype(np.float64)
    mean_LR = tok_ILR.mean(axis=0)
    per_layer = mean_LR.mean(axis=1, keepdims=True)
    return np.divide(mean_LR, per_layer, out=np.zeros_like(mean_LR), where=per_layer > 0)


def plot_gpu_load_heatmap(run: RunLike, out: str | os.PathLike) -> os.PathLike:
    """Layer × GPU heatmap of :func:`gpu_load_LR` for one run."""
    run = as_run(run)
    require(run, "rank_tokens")
    rel_LR = gpu_load_LR(run)
    L, R = rel_LR.shape
    fig, ax = new_figure(width=min(14.0, 3.0 + 0.35 * R), height=min(9.0, 2.0 + 0.22 * L))
    img = ax.imshow(rel_LR, aspect="auto", origin="lower", cmap="magma", vmin=0,
                    vmax=max(2.0, float(rel_LR.max())), interpolation="nearest")
    ax.set(xlabel="GPU (rank)", ylabel="MoE layer")
    fig.colorbar(img, ax=ax, label="tokens computed / mean GPU (1 = balanced)")
    ax.set_title(titled(f"GPU load — {run_label(run)} (max/mean {rel_LR.max():.2f})", [run]),
                 fontsize=9)
    mark_incomplete(fig, [run])
    return save_figure(fig, out)
