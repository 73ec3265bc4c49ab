"""Build of the optional C greedy (``moesim.policies._greedy_c``); everything else is in
pyproject.toml. Without a C compiler the build skips it and the planner runs its Python greedy
(same decisions, slower)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("moesim.policies._greedy_c", ["policies/_greedy_c.c"],
                             extra_compile_args=["-O2"], optional=True)])
