"""Lucid's front: the `lucid` command line, the high-level `ask`, heatmaps and benchmarks.

This package ties `vlm/`, `mitigation/`, `lucid_kernels/` and `testbed/` together for people; the other
packages never import it.
"""

__version__ = "0.1.0"
