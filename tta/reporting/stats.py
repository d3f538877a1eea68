"""Small statistics helpers for comparing runs.

The tests and intervals are thin, documented wrappers around scipy or
statsmodels: the point is to call the well-tested library routine with the
right options (and handle the empty / tiny-sample edge cases the same way
everywhere), not to re-implement the statistics.  The one formula written out
here is :func:`min_detectable_difference`, a closed-form power calculation.

Conventions:
- intervals are two-sided with coverage ``1 - alpha`` (95% by default);
- an interval that cannot be computed (no data, or a bootstrap over fewer than
  two values) is reported as NaN rather than as a misleadingly narrow number.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
from scipy import stats as _scipy_stats
from statsmodels.stats.contingency_tables import mcnemar as _mcnemar
from statsmodels.stats.multitest import multipletests as _multipletests
from statsmodels.stats.proportion import proportion_confint as _proportion_confint

NAN = float("nan")


class Estimate(NamedTuple):
    """A point estimate with its interval; unpacks as ``value, lo, hi``."""

    value: float
    lo: float
    hi: float


class McNemar(NamedTuple):
    """Discordant counts and the exact two-sided McNemar p-value."""

    b_only: int  # items solved by b and not by a
    a_only: int  # items solved by a and not by b
    p: float


def wilson_interval(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes out of ``n`` trials.

    Wilson rather than the normal approximation because ARC accuracies are
    often near 0 and n is a few hundred at most, where the normal interval
    undercovers and can leave [0, 1].  Returns ``(nan, nan)`` when n == 0.
    """
    if n == 0:
        return (NAN, NAN)
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}")
    lo, hi = _proportion_confint(k, n, alpha=alpha, method="wilson")
    return (float(lo), float(hi))


def bootstrap_mean_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0,
                      alpha: float = 0.05) -> Estimate:
    """Mean of ``values`` with a percentile bootstrap interval.

    NaNs are dropped first (a metric that was not measured on some tasks).
    With fewer than two values the interval is NaN: resampling one value
    would give a zero-width interval that claims certainty we do not have.
    """
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return Estimate(NAN, NAN, NAN)
    mean = float(x.mean())
    if x.size < 2:
        return Estimate(mean, NAN, NAN)
    res = _scipy_stats.bootstrap(
        (x,), np.mean, n_resamples=n_boot, confidence_level=1 - alpha,
        method="percentile", rng=np.random.default_rng(seed),
    )
    ci = res.confidence_interval
    return Estimate(mean, float(ci.low), float(ci.high))


def paired_bootstrap_diff(a: Sequence[float], b: Sequence[float], n_boot: int = 2000,
                          seed: int = 0, alpha: float = 0.05) -> Estimate:
    """Mean of the per-item differences ``a - b`` with a percentile bootstrap CI.

    ``a`` and ``b`` must be aligned (item i of both is the same task).  Pairs
    where either side is NaN are dropped.  Resampling whole pairs keeps the
    task-to-task correlation between the two runs, which is what makes the
    paired interval much narrower than comparing two separate intervals.
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired_bootstrap_diff needs aligned inputs, got {a.shape} and {b.shape}")
    d = a - b
    return bootstrap_mean_ci(d, n_boot=n_boot, seed=seed, alpha=alpha)


def mcnemar_exact(a_solved: Sequence[bool], b_solved: Sequence[bool]) -> McNemar:
    """Exact McNemar test on paired binary outcomes.

    Only the discordant items matter: the p-value is the two-sided binomial
    test of ``b_only`` vs ``a_only`` at 0.5.  Returns ``(b_only, a_only, p)``;
    with no discordant items p is 1.0.
    """
    a = np.asarray(a_solved, dtype=bool)
    b = np.asarray(b_solved, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mcnemar_exact needs aligned inputs, got {a.shape} and {b.shape}")
    both = int(np.sum(a & b))
    a_only = int(np.sum(a & ~b))
    b_only = int(np.sum(~a & b))
    neither = int(np.sum(~a & ~b))
    if a_only + b_only == 0:
        return McNemar(b_only, a_only, 1.0)
    result = _mcnemar([[both, a_only], [b_only, neither]], exact=True)
    return McNemar(b_only, a_only, float(result.pvalue))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order.

    NaN p-values (comparisons that could not be made) are passed through as
    NaN and do not count towards the number of tests.
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, NAN)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = _multipletests(p[ok], method="holm")[1]
    return [float(x) for x in out]



def min_detectable_difference(n: int, n_discordant: int, alpha: float = 0.05,
                              power: float = 0.8) -> float:
    """Smallest difference in solve rate a paired comparison of ``n`` tasks could detect.

    Normal approximation for McNemar's test: with ``n`` paired tasks of which
    a proportion ``p_d = n_discordant / n`` are solved by exactly one of the
    two runs, the difference of the two solve rates has standard error about
    ``sqrt(p_d / n)`` under the null, so the difference detectable with
    probability ``power`` by a two-sided test at level ``alpha`` is

        MDD = (z_{1 - alpha/2} + z_{power}) * sqrt(p_d / n)

    (1.960 + 0.842 = 2.802 at the defaults).  ``p_d`` is the observed
    discordance rate; when no task is discordant the value at one discordant
    task (``p_d = 1 / n``) is returned as a floor, since zero would claim any
    difference could be seen.  NaN when n == 0.  The result is a proportion
    (0.198 = 19.8 percentage points).
    """
    if n <= 0:
        return NAN
    if not 0 <= n_discordant <= n:
        raise ValueError(f"min_detectable_difference needs 0 <= n_discordant <= n, "
                         f"got {n_discordant} of {n}")
    p_d = max(n_discordant, 1) / n
    z = _scipy_stats.norm.ppf(1 - alpha / 2) + _scipy_stats.norm.ppf(power)
    return float(z * np.sqrt(p_d / n))
