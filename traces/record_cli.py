"""``moesim trace record``: record a real routing trace from a HF model or from training.

::

    moesim trace record --hf-model tiny-mixtral --text notes.txt --ranks 4 --tokens 256 -o t.npz
    moesim trace record --hf-model ./my-olmoe-checkpoint --ranks 8 --tokens 1024 -o olmoe.npz
    moesim trace record --train --corpus stdlib --steps 300 -o tinylm.npz

``--hf-model`` takes a built-in tiny model name (``tiny-mixtral``, ``tiny-olmoe``,
``tiny-qwen2-moe``, ``tiny-qwen3-moe``, ``tiny-jetmoe``, ``tiny-deepseek-v3``; random weights), a
``config.json`` (random weights), a local checkpoint directory, or a name already in the local
Hugging Face cache — nothing is downloaded. Without ``--text`` it feeds seeded random tokens
(fine for testing plumbing, not representative routing).

Wire-up: ``traces/cli.py`` calls ``add_record_parser(trace_subparsers)``.
"""

from __future__ import annotations

import argparse
import shlex
import sys

import numpy as np

from moesim.errors import MoesimError

# Built-in tiny models (moesim.traces.record_hf.tiny_configs; a test keeps the two in step).
TINY_MODELS = ("tiny-mixtral", "tiny-olmoe", "tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-jetmoe",
               "tiny-deepseek-v3")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json",
                   "vocab.txt", "spiece.model")
DEFAULT_SEQ_LEN = 128


def add_record_parser(trace_subparsers) -> argparse.ArgumentParser:
    """Add ``record`` to the ``moesim trace`` sub-commands; returns its parser."""
    p = trace_subparsers.add_parser(
        "record", help="record a routing trace from a Hugging Face MoE model or from training",
        description="Record a real routing trace: the chosen top-k experts of every MoE layer, "
                    "per pass and per simulated data-parallel rank.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-model", metavar="NAME_OR_CONFIG_OR_PATH",
                     help=f"a built-in tiny model ({', '.join(TINY_MODELS)}; random weights), "
                          "a config.json, a local checkpoint dir or a name in the local HF "
                          "cache (nothing is downloaded)")
    src.add_argument("--train", action="store_true", help="train the tiny MoE LM and record")
    p.add_argument("-o", "--out", "--output", dest="output", required=True,
                   help="output trace (.npz or directory)")
    p.add_argument("--ranks", type=int, default=4, help="simulated data-parallel ranks")
    p.add_argument("--tokens-per-rank", "--tokens", dest="tokens", type=int, default=None,
                   help="tokens per rank per pass (default 256 hf, 512 train)")
    p.add_argument("--seq-len", type=int, default=None,
                   help=f"sequence length (default: {DEFAULT_SEQ_LEN}; with --hf-model, --tokens "
                        "when that is fewer)")
    p.add_argument("--seed", type=int, default=0)
    hf = p.add_argument_group("--hf-model options")
    hf.add_argument("--text", nargs="+", metavar="FILE", help="text files to feed the model")
    hf.add_argument("--passes", type=int, default=None, help="passes (default: as text allows)")
    tr = p.add_argument_group("--train options")
    tr.add_argument("--corpus", nargs="+", default=["stdlib"], metavar="stdlib|FILE")
    tr.add_argument("--steps", type=int, default=300)
    tr.add_argument("--layers", type=int, default=4)
    tr.add_argument("--d-model", type=int, default=64)
    tr.add_argument("--ffn-hidden", type=int, default=128)
    tr.add_argument("--experts", type=int, default=16)
    tr.add_argument("--top-k", type=int, default=2)
    tr.add_argument("--aux-loss-coef", type=float, default=0.01)
    tr.add_argument("--capacity-factor", type=float, default=None, help="default: dropless")
    tr.add_argument("--lr", type=float, default=3e-3)
    tr.add_argument("--keep-topk", action="store_true", help="store per-token choices too")
    p.set_defaults(func=run_record)
    return p


def run_record(args: argparse.Namespace) -> int:
    """Handler of ``moesim trace record``."""
    from moesim.traces.io import save_trace

    if args.seq_len is None:       # --hf-model: fewer tokens than a sequence make one sequence
        args.seq_len = min(DEFAULT_SEQ_LEN, args.tokens or 256) if args.hf_model \
            else DEFAULT_SEQ_LEN
    trace = _record_hf(args) if args.hf_model else _record_train(args, train_command(args))
    path = save_trace(trace, args.output)
    c = trace.counts_TLRE.sum(2)
    ratio = c.max(-1) / np.maximum(c.mean(-1), 1e-12)
    print(f"wrote {path}: {trace.num_passes} passes × {trace.meta.num_layers} layers × "
          f"{trace.meta.num_ranks} ranks × {trace.meta.num_experts} experts (top-"
          f"{trace.meta.top_k}); max/mean load first pass {ratio[0].mean():.2f}, "
          f"last pass {ratio[-1].mean():.2f}")
    return 0


def train_command(args: argparse.Namespace) -> str:
    """The full ``moesim trace record --train`` command that reproduces ``args``."""
    parts = ["moesim", "trace", "record", "--train", "--corpus", *args.corpus]
    for flag in ("steps", "ranks", "tokens", "seq_len", "layers", "d_model", "ffn_hidden",
                 "experts", "top_k", "aux_loss_coef", "capacity_factor", "lr", "seed"):
        value = getattr(args, flag)
        if flag == "tokens" and value is None:
            value = 512
        if value is not None:
            parts += ["--" + flag.replace("_", "-"), str(value)]
    if args.keep_topk:
        parts.append("--keep-topk")
    return shlex.join([*parts, "-o", args.output])


def _record_hf(args: argparse.Namespace):
    from moesim.traces import record_hf as hf

    tokens = args.tokens or 256
    hf.check_sizes(args.ranks, tokens, args.seq_len)        # before the (slow) model load
    if args.passes is not None and args.passes < 1:
        raise MoesimError(f"--passes {args.passes} must be >= 1")
    model, how = hf.load_hf_model(args.hf_model, args.seed)
    vocab = int(model.config.vocab_size)
    if args.text:
        ids, tokenizer = hf.text_tokens(args.text, vocab, *_local_tokenizer(args.hf_model))
        feed = f"text {', '.join(args.text)}"
    else:
        passes = args.passes or 1
        ids = np.random.default_rng(args.seed).integers(0, vocab, passes * args.ranks * tokens)
        feed, tokenizer = f"random tokens (seed {args.seed})", "none (random ids)"
    return hf.record_hf(model, ids, ranks=args.ranks, tokens_per_rank=tokens,
                        seq_len=args.seq_len, passes=args.passes,
                        source=f"moesim trace record --hf-model {args.hf_model}",
                        extra={"model_from": how, "input": feed, "tokenizer": tokenizer,
                               "seq_len": args.seq_len})


def _local_tokenizer(spec: str) -> tuple[object | None, str]:
    """The checkpoint's own tokenizer when its folder has tokenizer files, and why not when
    not (the text is then read as bytes modulo the vocabulary)."""
    from pathlib import Path

    path = Path(spec)
    if not path.is_dir():
        return None, f"{spec} is not a checkpoint folder"
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None, f"no tokenizer files in {path}"
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(spec, local_files_only=True), ""
    except (OSError, ValueError) as exc:
        return None, f"its tokenizer did not load: {str(exc).splitlines()[0][:80]}"


def _record_train(args: argparse.Namespace, command: str):
    from moesim.traces.record_train import TrainRecordConfig, record_training
    from moesim.traces.tinylm import TinyLMConfig

    model = TinyLMConfig(num_layers=args.layers, d_model=args.d_model,
                         ffn_hidden=args.ffn_hidden, num_experts=args.experts, top_k=args.top_k,
                         seq_len=args.seq_len, aux_loss_coef=args.aux_loss_coef,
                         capacity_factor=args.capacity_factor)
    cfg = TrainRecordConfig(model=model, ranks=args.ranks, tokens_per_rank=args.tokens or 512,
                            steps=args.steps, lr=args.lr, seed=args.seed,
                            keep_topk=args.keep_topk)
    files = None if args.corpus == ["stdlib"] else args.corpus
    if files and "stdlib" in files:
        raise MoesimError("--corpus takes either 'stdlib' or a list of files, not both")
    return record_training(cfg, files, command=command,
                           log=lambda msg: print(msg, file=sys.stderr))


def main(argv: list[str] | None = None) -> int:
    """``python -m moesim.traces.record_cli ...`` — the same as ``moesim trace record ...``."""
    parser = argparse.ArgumentParser(prog="moesim trace")
    add_record_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["record", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run_record(args)
    except MoesimError as exc:
        print(f"moesim: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
