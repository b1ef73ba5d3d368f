"""Student's t quantiles without SciPy, for confidence intervals of a mean.

For an integer number of degrees of freedom the distribution function has a closed
form (Abramowitz & Stegun 26.7.3 and 26.7.4), inverted here by bisection; above
``_SERIES_LIMIT`` degrees of freedom the Cornish-Fisher expansion around the normal
quantile (A&S 26.7.5) is used, accurate to better than 1e-9 there.
"""

from __future__ import annotations

import math
from functools import lru_cache
from statistics import NormalDist

_SERIES_LIMIT = 200


def t_central(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with ``df`` degrees of freedom (t >= 0)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    s = math.sin(theta)
    if df % 2 == 0:
        term = total = 1.0
        for j in range(1, df // 2):
            term *= c2 * (2 * j - 1) / (2 * j)
            total += term
        return s * total
    if df == 1:
        return 2 * theta / math.pi
    term = total = math.cos(theta)
    for j in range(2, (df - 1) // 2 + 1):
        term *= c2 * (2 * j - 2) / (2 * j - 1)
        total += term
    return 2 / math.pi * (theta + s * total)


@lru_cache(maxsize=4096)
def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` >= 1 degrees of freedom (0.5 < p < 1)."""
    if not 0.5 < p < 1:
        raise ValueError("p must be between 0.5 and 1")
    if df < 1:
        raise ValueError("df must be at least 1")
    if df > _SERIES_LIMIT:
        z = NormalDist().inv_cdf(p)
        g1 = (z**3 + z) / 4
        g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
        g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
        g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
        return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4
    target = 2 * p - 1  # P(|T| <= t)
    lo, hi = 0.0, 1.0
    while t_central(hi, df) < target:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_central(mid, df) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return (lo + hi) / 2


def mean_ci(values: list[float], level: float = 0.95) -> dict[str, float]:
    """n, mean, sample standard deviation, standard error and the t-interval of the mean.

    None and NaN values are left out. With one value the spread is unknown: std, sem
    and the interval are NaN; with none, the mean is NaN too.

    Args:
        values: The sample.
        level: The interval's confidence level.

    Returns:
        The keys ``n``, ``mean``, ``std`` (n - 1 in the denominator), ``sem``,
        ``ci_low`` and ``ci_high``.
    """
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(xs)
    nan = float("nan")
    if n == 0:
        return {"n": 0, "mean": nan, "std": nan, "sem": nan, "ci_low": nan, "ci_high": nan}
    mean = math.fsum(xs) / n
    if n == 1:
        return {"n": 1, "mean": mean, "std": nan, "sem": nan, "ci_low": nan, "ci_high": nan}
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    sem = std / math.sqrt(n)
    half = t_quantile(0.5 + level / 2, n - 1) * sem
    return {
        "n": n,
        "mean": mean,
        "std": std,
        "sem": sem,
        "ci_low": mean - half,
        "ci_high": mean + half,
    }
