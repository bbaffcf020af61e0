"""The statistics of every benchmark: a median with its bootstrap interval.

Timings on a shared machine are noisy and skewed, so benchmarks report medians; paths compared with each
other are timed interleaved and compared pair by pair (a ratio per round), and each median carries a 95 %
percentile-bootstrap interval over the rounds (seeded, so a table is reproducible from its raw rounds).
"""

from __future__ import annotations

import numpy as np


def bootstrap_median(values: list[float], seed: int = 0, n: int = 2000) -> tuple[float, float, float]:
    """(median, 2.5 %, 97.5 %) of the median of `values` under resampling (seeded)."""
    v = np.asarray(values, dtype=float)
    if len(v) == 1:
        return float(v[0]), float(v[0]), float(v[0])
    meds = np.median(v[np.random.default_rng(seed).integers(0, len(v), (n, len(v)))], axis=1)
    return float(np.median(v)), float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))
