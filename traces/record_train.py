"""Record a real training routing trace: train :mod:`moesim.traces.tinylm` on text, on CPU.

Shape legend: ``T`` recorded steps, ``L`` MoE layers, ``R`` simulated data-parallel ranks,
``E`` experts, ``N`` tokens per rank per step, ``K`` top-k, ``B`` sequences, ``S`` their length.

Every training step is one pass: its batch of ``R · N`` tokens (``R · N / S`` random windows of
the corpus) is split into ``R`` contiguous groups of whole sequences, one per simulated rank, and
every MoE layer's *chosen* experts (before capacity drops) become ``counts_TLRE`` and, when kept,
``topk_TLRNK``. Drops, losses and the exact recipe (config, seed, corpus digest, torch and
Python versions, the command) go into ``meta.extra``. Same recipe + same versions → identical
trace (single-threaded, deterministic kernels).

The default corpus is the Python standard library's own ``*.py`` sources
(``sysconfig.get_paths()["stdlib"]`` in the fixed order of :func:`stdlib_files`, the first
``max_corpus_bytes`` bytes), so nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from moesim.errors import MoesimError
from moesim.traces.format import RoutingTrace, TraceMeta
from moesim.traces.tinylm import Adam, TinyLMConfig, TinyMoELM, build_model


@dataclass(frozen=True, kw_only=True)
class TrainRecordConfig:
    """Recording knobs: ranks × tokens per rank per step, steps, optimiser, seed, threads."""

    model: TinyLMConfig = field(default_factory=TinyLMConfig)
    ranks: int = 4
    tokens_per_rank: int = 512
    steps: int = 300
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    seed: int = 0
    keep_topk: bool = False
    threads: int = 1
    max_corpus_bytes: int = 8_000_000

    def __post_init__(self) -> None:
        for name in ("ranks", "tokens_per_rank", "steps", "threads", "max_corpus_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise MoesimError(f"{name}={value!r} must be a positive integer")
        if self.tokens_per_rank % self.model.seq_len:
            raise MoesimError(f"tokens_per_rank={self.tokens_per_rank} must be a multiple of "
                              f"seq_len={self.model.seq_len}")
        if not self.lr > 0:
            raise MoesimError(f"lr={self.lr!r} must be > 0")

    @property
    def seqs_per_rank(self) -> int:
        return self.tokens_per_rank // self.model.seq_len


@dataclass(frozen=True)
class Corpus:
    """Training bytes and where they came from."""

    data_U8: np.ndarray
    description: str
    num_files: int
    sha256: str


def stdlib_files(max_bytes: int | None = None) -> list[Path]:
    """The standard library's ``*.py`` files in a fixed order, up to ``max_bytes`` of them.

    Order: a depth-first walk from the stdlib root with directory and file names sorted, a
    directory's own files before its sub-directories; ``site-packages``, ``__pycache__`` and
    hidden directories skipped. The walk stops once the files listed hold ``max_bytes``.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "__pycache__")
                         and not d.startswith("."))
        for name in sorted(f for f in files if f.endswith(".py")):
            out.append(Path(here) / name)
            total += (Path(here) / name).stat().st_size
            if max_bytes is not None and total >= max_bytes:
                return out
    return out


def load_corpus(files: Sequence[str | Path] | None = None, max_bytes: int = 8_000_000) -> Corpus:
    """Concatenate ``files`` (default: the stdlib sources) up to ``max_bytes`` bytes."""
    paths = stdlib_files(max_bytes) if files is None else [Path(f) for f in files]
    chunks, total, used = [], 0, 0
    for path in paths:
        if total >= max_bytes:
            break
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise MoesimError(f"cannot read corpus file {path}: {exc.strerror}; "
                              "check the path") from None
        chunks.append(raw[:max_bytes - total])
        total += len(chunks[-1])
        used += 1
    data = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    desc = ("python-stdlib-" + platform.python_version() if files is None
            else f"{len(paths)} user file(s)")
    return Corpus(data, desc, used, hashlib.sha256(data.tobytes()).hexdigest())


def sample_batch(corpus: Corpus, num_seqs: int, seq_len: int,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_seqs`` random windows: inputs and next-byte targets, int64 ``[B, S]`` each."""
    data = corpus.data_U8
    if len(data) < seq_len + 2:
        raise MoesimError(f"corpus has {len(data)} bytes; it needs more than {seq_len + 1}")
    starts = rng.integers(0, len(data) - seq_len - 1, size=num_seqs)
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    win = torch.from_numpy(data[idx].astype(np.int64))
    return win[:, :-1], win[:, 1:]


def routing_record(routings, ranks: int) -> tuple[np.ndarray, np.ndarray]:
    """One step's chosen experts ``topk_LRNK`` (int32) and drops ``dropped_LR``."""
    topk = np.stack([r.topk_NK.numpy().reshape(ranks, -1, r.topk_NK.shape[1])
                     for r in routings]).astype(np.int32)
    dropped = np.stack([(~r.keep_NK).numpy().reshape(ranks, -1).sum(1) for r in routings])
    return topk, dropped


def counts_from_topk(topk_LRNK: np.ndarray, num_experts: int) -> np.ndarray:
    """Per-(layer, rank) expert histograms ``[L, R, E]`` of top-k ids (``-1`` ignored)."""
    L, R = topk_LRNK.shape[:2]
    flat = topk_LRNK.reshape(L * R, -1).astype(np.int64)
    offs = np.arange(L * R)[:, None] * (num_experts + 1)
    ids = np.where(flat >= 0, flat, num_experts) + offs
    hist = np.bincount(ids.ravel(), minlength=L * R * (num_experts + 1))
    return hist.reshape(L, R, num_experts + 1)[..., :num_experts]


def _lr_at(step: int, cfg: TrainRecordConfig) -> float:
    """Linear warm-up then cosine decay to 10% of ``lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.45 * (1 + np.cos(np.pi * frac)))


def _train_steps(model: TinyMoELM, corpus: Corpus, cfg: TrainRecordConfig, log) -> dict:
    """The training loop; returns per-step arrays (topk, counts, dropped, losses)."""
    rng = np.random.default_rng(cfg.seed)
    opt = Adam(list(model.parameters()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    out = {"topk": [], "counts": [], "dropped": [], "lm_loss": [], "aux_loss": []}
    for step in range(cfg.steps):
        x, y = sample_batch(corpus, cfg.ranks * cfg.seqs_per_rank, cfg.model.seq_len, rng)
        opt.lr = _lr_at(step, cfg)
        loss, lm, routings = model(x, y, groups=cfg.ranks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        topk, dropped = routing_record(routings, cfg.ranks)
        out["counts"].append(counts_from_topk(topk, cfg.model.num_experts))
        if cfg.keep_topk:
            out["topk"].append(topk)
        out["dropped"].append(dropped)
        out["lm_loss"].append(float(lm.detach()))
        out["aux_loss"].append(float(torch.stack([r.aux_loss.detach() for r in routings]).mean()))
        if log is not None and (step % 25 == 0 or step == cfg.steps - 1):
            log(f"step {step:4d}  lm_loss {float(lm.detach()):.4f}  dropped {int(dropped.sum())}")
    return out


def record_training(cfg: TrainRecordConfig, corpus_files: Sequence[str | Path] | None = None,
                    command: str = "", log=None) -> RoutingTrace:
    """Train the tiny MoE LM per ``cfg`` and return its routing trace (one pass per step)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        corpus = load_corpus(corpus_files, cfg.max_corpus_bytes)
        model = build_model(cfg.model, cfg.seed)
        start = time.perf_counter()
        out = _train_steps(model, corpus, cfg, log)
        wall_s = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
    return _to_trace(out, cfg, corpus, command, wall_s)


def _to_trace(out: dict, cfg: TrainRecordConfig, corpus: Corpus, command: str,
              wall_s: float) -> RoutingTrace:
    m = cfg.model
    meta = TraceMeta(
        num_layers=m.num_layers, num_ranks=cfg.ranks, num_experts=m.num_experts, top_k=m.top_k,
        tokens_per_rank=cfg.tokens_per_rank, micro_batches_per_iteration=1, iteration_stride=1,
        first_iteration=1, hidden_size=m.d_model, ffn_hidden_size=m.ffn_hidden,
        model=f"tinylm-L{m.num_layers}-d{m.d_model}-E{m.num_experts}k{m.top_k}",
        source=f"moesim tinylm training on {corpus.description}"
               + (f" ({command})" if command else ""),
        license="PSF-2.0 (corpus: Python standard library)" if "stdlib" in corpus.description
        else "",
        extra={
            "recipe": {k: v for k, v in asdict(cfg).items() if k != "model"},
            "model_config": m.to_dict(),
            "command": command,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "numpy_version": np.__version__,
            "corpus": {"description": corpus.description, "files": corpus.num_files,
                       "bytes": int(corpus.data_U8.size), "sha256": corpus.sha256},
            "counts_are": "chosen top-k assignments before capacity drops",
            "lm_loss": [round(v, 5) for v in out["lm_loss"]],
            "aux_loss": [round(v, 5) for v in out["aux_loss"]],
            "dropped_TL": np.stack(out["dropped"]).sum(2).tolist(),
            "wall_s": round(wall_s, 2),
        },
    )
    topk = np.stack(out["topk"]) if out["topk"] else None
    return RoutingTrace(np.stack(out["counts"]).astype(np.int64), meta, topk)
