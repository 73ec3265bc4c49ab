"""Pipeline send/receive on gloo: what one ``pp_send`` op costs, and what the executor times.

``python benchmarks/p2p_send.py [--model small-cpu] [--reps 30] [--busy-ms 30]`` starts two
gloo processes on this machine and times ``dist.batch_isend_irecv`` of one micro-batch's
activation (``tokens_per_rank × hidden`` elements, what :func:`moesim.executor.flow_comm.pp_send`
moves), plus 4 KiB–4 MiB for the latency/bandwidth fit, in four ways:

- ``one-way``: rank 0 sends, rank 1 receives, both blocked in ``wait()`` (the op alone);
- ``both-ways``: each rank sends to and receives from the other in one batch (1F1B's steady
  state: a forward activation one way and a gradient the other at once);
- ``async+busy``: as the executor runs a ``p2p``-stream op on CPU
  (:class:`moesim.executor.timing.InFlight`): the batch is started, a thread waits for it and
  stamps its end, and the main thread computes (fp32 GEMMs, ``--busy-ms``) meanwhile;
- ``async+idle``: the same thread-stamped send with the main thread idle;
- ``async+busy-sender``: only the sender computes; the receiver, blocked, stamps the transfer's
  real end, so its time against the sender's stamp tells a slow transfer from a late stamp.

Per mode the table gives the slower rank's median; the sender's and receiver's medians at the
activation size are printed below it.

Times are from the later of the two ranks' starts (one host: ``perf_counter`` is one clock) to
each rank's end, the executor's definition (:func:`moesim.executor.record.measured_schedule`),
median over ``--reps``. It prints a table and the α–β fit of each mode (least squares on relative
error), next to the ``send_recv`` link of a calibrated profile if ``--cluster`` gives one.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZES = tuple(4096 * 4**k for k in range(6))  # 4 KiB .. 4 MiB
MODES = ("one-way", "both-ways", "async+idle", "async+busy", "async+busy-sender")


def _batch(buf: torch.Tensor, out: torch.Tensor, rank: int, mode: str) -> list:
    peer = 1 - rank
    if mode == "both-ways":
        ops = [dist.P2POp(dist.isend, buf, peer), dist.P2POp(dist.irecv, out, peer)]
    elif rank == 0:
        ops = [dist.P2POp(dist.isend, buf, peer)]
    else:
        ops = [dist.P2POp(dist.irecv, out, peer)]
    return dist.batch_isend_irecv(ops)


def _one(rank: int, nbytes: int, mode: str, busy_s: float, work: tuple) -> float:
    """One timed transfer: seconds from the later start to this rank's end."""
    n = nbytes // 4
    buf, out = torch.randn(n), torch.empty(n)
    dist.barrier()
    start = time.perf_counter()
    if mode.startswith("async"):
        stamp = [0.0]
        works = _batch(buf, out, rank, mode)

        def wait() -> None:
            for w in works:
                w.wait()
            stamp[0] = time.perf_counter()
        th = threading.Thread(target=wait, daemon=True)
        th.start()
        if mode == "async+busy" or (mode == "async+busy-sender" and rank == 0):
            end_busy = time.perf_counter() + busy_s
            while time.perf_counter() < end_busy:
                torch.matmul(*work)
        th.join()
        end = stamp[0]
    else:
        for w in _batch(buf, out, rank, mode):
            w.wait()
        end = time.perf_counter()
    t = torch.tensor([start, end], dtype=torch.float64)
    both = [torch.zeros(2, dtype=torch.float64) for _ in range(2)]
    dist.all_gather(both, t)
    later = max(float(b[0]) for b in both)
    return end - later


def _worker(rank: int, port: int, args: argparse.Namespace, act_bytes: int, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    work = (torch.randn(256, 256), torch.randn(256, 256))
    rows = []
    for mode in MODES:
        for nbytes in sorted({*SIZES, act_bytes}):
            ts = [_one(rank, nbytes, mode, args.busy_ms / 1e3, work) for _ in range(args.reps)]
            rows.append((mode, nbytes, rank, float(np.median(ts[2:]))))
    q.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def fit(x: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    """``t ≈ α + x/β`` on relative error, non-negative: ``(α s, β bytes/s)``."""
    from scipy.optimize import nnls

    (alpha, inv), _ = nnls(np.stack([1 / t, x / t], axis=1), np.ones_like(t))
    return float(alpha), float(1 / max(inv, 1e-15))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="small-cpu")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--busy-ms", type=float, default=30.0)
    p.add_argument("--cluster", default=None, help="a calibrated cluster TOML to compare with")
    args = p.parse_args(argv)
    from moesim.specs import load_cluster, load_model

    m = load_model(args.model)
    act = int(m.tokens_per_rank * m.hidden_size * m.bytes_activation)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, args, act, q)) for r in range(2)]
    for pr in procs:
        pr.start()
    rows = q.get() + q.get()
    for pr in procs:
        pr.join()
    load = os.getloadavg()[0]
    print(f"gloo batch_isend_irecv, 2 local ranks, median of {args.reps}, load average "
          f"{load:.2f}; activation {act / 2**10:.0f} KiB ({args.model})")
    print(f"| mode | {' | '.join(f'{b // 1024} KiB' for b in sorted({*SIZES, act}))} |"
          " α µs | β GB/s |")
    print("|---|" + "---:|" * (len({*SIZES, act}) + 2))
    for mode in MODES:
        sel = sorted((b, r, t) for mo, b, r, t in rows if mo == mode)
        per = {b: max(t for bb, _, t in sel if bb == b) for b, _, _ in sel}  # the slower rank
        a, beta = fit(np.array(list(per), float), np.array(list(per.values())))
        print(f"| {mode} | {' | '.join(f'{per[b] * 1e3:.2f}' for b in sorted(per))} | "
              f"{a * 1e6:.0f} | {beta / 1e9:.2f} |")
    for mode in MODES:
        at = {r: t for mo, b, r, t in rows if mo == mode and b == act}
        print(f"  {mode:18s} activation: rank 0 (sends) {at[0] * 1e3:.2f} ms, rank 1 "
              f"(receives) {at[1] * 1e3:.2f} ms")
    if args.cluster:
        bw, lat = load_cluster(args.cluster).intra.for_kind("send_recv")
        print(f"calibrated send_recv ({args.cluster}): α {lat * 1e6:.0f} µs, β {bw:.2f} GB/s "
              f"-> activation {(lat + act / (bw * 1e9)) * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
