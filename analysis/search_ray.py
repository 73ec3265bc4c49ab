"""Offline policy search on a Ray cluster: every configuration one Ray task.

``moesim search SPEC --ray [ADDRESS]`` hands the configurations to a running Ray cluster
(``ray start --head`` on one machine, ``ray start --address HEAD:6379`` on the others) instead
of the local process pool. Everything else is :mod:`moesim.analysis.search`'s: the driver (the
process that ran ``moesim search``) is the only writer of ``results.jsonl``, appending each
record atomically as its task finishes, so ``--resume`` after a kill of the driver loses
nothing; ranking and Pareto front come from the same records, hence are the local pool's.

Each task runs :func:`moesim.analysis.search.run_one`, which records a configuration's own
failures (a bad knob, out of memory) as on the local pool. A task whose *worker* dies (killed,
node lost) is retried by Ray up to ``retries`` times, then reported for that configuration
alone (``status: "error"``, ``error: "worker failed after N retries: ..."``); the others go on.

Addresses: ``auto`` (default: the cluster this machine joined with ``ray start``), ``HOST:PORT``
or ``ray://HOST:10001`` (Ray client), or ``local`` (start a private Ray on this machine for
the search's duration). When this process already called ``ray.init`` that session is used
as is. Workers must see the traces (and ``--save-runs`` directories) at the same paths: run from
a shared filesystem on a multi-node cluster. Ray is an optional extra: ``pip install
'moesim[ray]'``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from moesim.errors import MoesimError

from .search_spec import config_key

DEFAULT_RETRIES = 2


def import_ray():
    """The ``ray`` module, or a MoesimError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise MoesimError("--ray needs the Ray package; install it with "
                          "`pip install 'moesim[ray]'` (or `pip install ray`)") from None
    return ray


def connect(ray, address: str) -> bool:
    """Join the cluster at ``address`` unless this process is connected already; returns
    whether we connected (and so must disconnect)."""
    if ray.is_initialized():
        return False
    kwargs = {"include_dashboard": False} if address == "local" else {}
    try:
        ray.init(address=None if address == "local" else address, log_to_driver=False,
                 **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise MoesimError(f"cannot reach a Ray cluster at {address!r} ({_short(exc)}); start "
                          "one with `ray start --head`, pass its address (--ray HOST:6379), "
                          "or use --ray local") from None
    return True


def execute_ray(todo: Sequence[dict], runs_dir: Path | None, evaluate, address: str = "auto",
                retries: int = DEFAULT_RETRIES) -> Iterator[dict]:
    """Yield one record per configuration as its Ray task finishes (any order); a task whose
    worker died ``retries + 1`` times yields an error record for its configuration."""
    from .search import run_one

    ray = import_ray()
    started = connect(ray, address)
    task = ray.remote(num_cpus=1, max_retries=retries, retry_exceptions=False)(run_one)
    pending = {}
    try:
        for cfg in todo:
            where = runs_dir / config_key(cfg) if runs_dir is not None else None
            pending[task.remote(evaluate, cfg, where)] = cfg
        while pending:
            finished, _ = ray.wait(list(pending), num_returns=1)
            for ref in finished:
                cfg = pending.pop(ref)
                try:
                    yield ray.get(ref)
                except Exception as exc:            # the worker died on every try
                    yield failed_record(cfg, f"worker failed after {retries} retries: "
                                             f"{type(exc).__name__}: {_short(exc)}")
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()


def failed_record(config: dict, error: str) -> dict:
    """The record of a configuration that never got a result (shape of ``run_one``'s)."""
    return {"key": config_key(config), "config": config, "status": "error", "oom": False,
            "error": error, "summary": {}, "elapsed_s": 0.0}


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] + ("..." if len(text) > 200 else "")
