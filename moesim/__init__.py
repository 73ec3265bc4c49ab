"""moesim: expert placement policies for Mixture-of-Experts training, simulated and executed.

Import-light on purpose: ``moesim.traces`` and friends live in sibling folders mapped into this
namespace (see pyproject ``package-dir``), and importing one must not drag in the others.
"""

__version__ = "0.1.0"
