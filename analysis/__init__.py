"""Analysis: reads RunResults only; one function per figure; searches, rankings and reports.

- ``plots``, ``timeline``, ``compare`` — one function per figure (``moesim plot``);
  ``figures`` is the catalogue (``moesim plot KIND`` / ``plot all``).
- ``search`` (+ ``search_spec``, ``ranking``, ``simulate_adapter``) — offline policy search over
  a spec's grid on a process pool, crash-safe ``results.jsonl``, ranking and Pareto front
  (``moesim search``).
- ``report`` — one self-contained HTML page of searches, validations and runs
  (``moesim report``).
- ``validation`` — predicted-vs-measured error tables (``moesim validate``).
"""
