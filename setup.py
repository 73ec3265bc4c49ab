"""Build of the optional C kernels (``moesim.policies._greedy_c``, ``moesim.traces._synth_c``,
``moesim._block_sums``);
everything else is in pyproject.toml. Without a C compiler the build skips them and moesim runs
their Python versions (the same decisions / the same counts, slower)."""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("moesim.policies._greedy_c", ["policies/_greedy_c.c"],
              extra_compile_args=["-O2"], optional=True),
    # -ffp-contract=off: no fused multiply-add, so every float op rounds as numpy's do
    Extension("moesim.traces._synth_c", ["traces/_synth_c.c"],
              extra_compile_args=["-O3", "-ffp-contract=off"], optional=True),
    # integer sums only: exact whatever the order
    Extension("moesim._block_sums", ["moesim/_block_sums.c"], extra_compile_args=["-O3"],
              optional=True),
])
