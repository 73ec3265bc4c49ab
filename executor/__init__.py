"""The executor: runs lowered programs on torch.distributed (gloo on CPU, NCCL on GPU).

Replay mode (``moesim run``) executes the same :class:`~moesim.ops.Program` the simulator costs,
with real tensors and forced routing, and writes the same RunResult (backend ``executor``).

- :mod:`.worker` — the per-rank entry point (``torchrun -m moesim.executor.worker``); the loop
- :mod:`.launch` — N local ranks with a fresh rendezvous and a watchdog (``moesim run``)
- :mod:`.plan` — decisions and programs of a trace slice, exactly as the simulator makes them
- :mod:`.interpreter` — walks a program op by op on one rank; :mod:`.timing` times the ops
- :mod:`.moe_layer` — dispatch / expert / combine (forward and backward) of one layer-pass
- :mod:`.replay` — deterministic weights, tokens and forced routing; the expert FFN
- :mod:`.reference` — the single-process reference MoE layer; :mod:`.check` compares with it
- :mod:`.groups` — process groups derived from a program, created once
- :mod:`.record` — measured times → RunResult records (simulator's conventions)
- :mod:`.calibrate` (launch, profile), :mod:`.calibrate_fit` (fitting), :mod:`.calibrate_bench`,
  :mod:`.calibrate_collectives`, :mod:`.calibrate_block` (microbenchmarks) — ``moesim calibrate``
- :mod:`.validate` — ``moesim validate``; :mod:`.selfcheck` — many policies checked in one launch
- :mod:`.cli` — the ``run`` / ``calibrate`` / ``validate`` subcommands
- :mod:`.train` — train mode: a small MoE trained for real under a policy (time-to-loss)
"""
