"""Summaries over seeds: means with Student-t confidence intervals, paired differences.

Pure functions of lists of floats (one value per seed); NaN where a quantity needs more
seeds than given (an interval needs two).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from pdml.experiments.design import CONFIDENCE


def mean_ci(values: Sequence[float], level: float = CONFIDENCE) -> dict:
    """``{"n", "mean", "sd", "lo", "hi"}`` of ``values``: the sample mean, the sample sd
    (ddof 1) and the two-sided ``level`` Student-t interval of the mean."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    n = int(x.size)
    if n == 0:
        raise ValueError("values: no value to summarise")
    if not np.isfinite(x).all():
        raise ValueError(f"values must be finite, got {list(values)}")
    mean = float(x.mean())
    if n < 2:
        return {"n": n, "mean": mean, "sd": math.nan, "lo": math.nan, "hi": math.nan}
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half}


def paired_difference(a: Sequence[float], b: Sequence[float],
                      level: float = CONFIDENCE) -> dict:
    """``a − b`` paired element by element (the same seed in two arms): :func:`mean_ci`
    of the differences, with their values and the paired t-test's two-sided ``p``."""
    from scipy import stats

    if len(a) != len(b):
        raise ValueError(f"a and b must be paired (same length), got {len(a)} and {len(b)}")
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    out = mean_ci(diffs, level)
    out["values"] = diffs
    if len(diffs) >= 2 and out["sd"] > 0:
        out["p"] = float(stats.ttest_rel(a, b).pvalue)
    else:
        out["p"] = math.nan
    return out


def excludes_zero(interval: dict) -> str:
    """Where a :func:`mean_ci` interval lies: "below" 0, "above" 0, or "spans" it (also
    when it could not be computed)."""
    if math.isnan(interval["hi"]):
        return "spans"
    if interval["hi"] < 0:
        return "below"
    if interval["lo"] > 0:
        return "above"
    return "spans"
