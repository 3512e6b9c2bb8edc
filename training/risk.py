"""Finite-sample tests that a risk stays below a bound, and the fixed-sequence procedure that chains them.

Everything here is pure numpy over per-sample losses in ``[0, 1]``. Each test asks whether the data let us reject
the null hypothesis ``H0: E[loss] > bound``; a p-value ``p`` with ``P(p <= d | H0) <= d`` for every ``d`` lets the
caller reject at level ``delta`` when ``p <= delta``. These are the building blocks of Learn-then-Test calibration
(Angelopoulos, Bates, Candes, Jordan and Lei, 2021): test candidate thresholds in a fixed order, stop at the first
one that cannot be certified, and every threshold certified before it has risk <= bound with probability
>= 1 - delta over the draw of the calibration data.

* ``wsr`` - a betting test (Waudby-Smith and Ramdas, 2020): the capital of a gambler who bets against the null
  grows when losses come in below the bound. Adapts to the variance of the losses, which matters when most losses
  sit at one value (an accuracy drop against the final exit is zero for nearly every sample).
* ``hb`` - the Hoeffding-Bentkus p-value (Bates et al., 2021): the smaller of Hoeffding's bound and Bentkus's
  binomial-tail bound on the sample mean.
* ``binomial`` - the exact binomial tail, for losses that are 0 or 1 (a sample was answered wrongly).
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np

BOUNDS = ("wsr", "hb", "binomial")


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space so that it stays exact for large ``n``."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    i = np.arange(0, k + 1, dtype=np.float64)
    log_pmf = (math.lgamma(n + 1) - np.array([math.lgamma(x + 1) for x in i])
               - np.array([math.lgamma(n - x + 1) for x in i]) + i * math.log(p) + (n - i) * math.log1p(-p))
    top = log_pmf.max()
    return float(min(1.0, math.exp(top) * np.exp(log_pmf - top).sum()))


def _check(losses: np.ndarray, bound: float) -> np.ndarray:
    z = np.asarray(losses, dtype=np.float64).ravel()
    if z.size == 0:
        raise ValueError("cannot test a risk on zero samples")
    if z.min() < 0 or z.max() > 1:
        raise ValueError("losses must lie in [0, 1]")
    if not 0 < bound < 1:
        raise ValueError(f"the risk bound must lie in (0, 1), got {bound}")
    return z


def binomial_pvalue(losses: np.ndarray, bound: float) -> float:
    """Exact p-value for ``H0: P(loss = 1) > bound`` from 0/1 losses: P(Binomial(n, bound) <= observed ones)."""
    z = _check(losses, bound)
    if not np.all((z == 0) | (z == 1)):
        raise ValueError("the binomial test needs losses that are 0 or 1")
    return binomial_cdf(int(z.sum()), z.size, bound)


def hb_pvalue(losses: np.ndarray, bound: float) -> float:
    """Hoeffding-Bentkus p-value for ``H0: E[loss] > bound`` from losses in [0, 1]."""
    z = _check(losses, bound)
    n, mean = z.size, float(z.mean())
    if mean >= bound:
        hoeffding = 1.0
    else:
        a, b = mean, bound  # n * KL(a || b), Hoeffding's exponent for a mean in [0, 1]
        kl = (a * math.log(a / b) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - b))
        hoeffding = math.exp(-n * kl)
    bentkus = math.e * binomial_cdf(math.ceil(n * mean), n, bound)
    return min(1.0, hoeffding, bentkus)


def wsr_pvalue(losses: np.ndarray, bound: float, delta: float = 0.1, truncation: float = 0.5) -> float:
    """Betting p-value for ``H0: E[loss] > bound`` from losses in [0, 1], taken in the order given.

    The capital ``K_t = prod_i (1 + lam_i * (bound - loss_i))`` is a non-negative supermartingale under the null
    whenever each bet ``lam_i`` depends only on earlier losses and keeps every factor positive, so by Ville's
    inequality ``P(max_t K_t >= 1 / d) <= d`` and ``1 / max_t K_t`` is a valid p-value. The bets follow the
    predictable plug-in rule ``sqrt(2 log(1/delta) / (n * running variance))``, capped at ``truncation / (1 - bound)``
    (which keeps each factor >= 1 - truncation). ``delta`` only tunes the bets; validity holds at every level.
    """
    z = _check(losses, bound)
    n = z.size
    t = np.arange(1, n + 1, dtype=np.float64)
    mean = (0.5 + np.cumsum(z)) / (t + 1)                          # running mean, started at 1/2
    var = (0.25 + np.cumsum((z - mean) ** 2)) / (t + 1)            # running variance, started at 1/4
    prev_var = np.concatenate([[0.25], var[:-1]])                  # only losses before i inform bet i
    lam = np.minimum(np.sqrt(2 * math.log(1 / delta) / (n * prev_var)), truncation / (1 - bound))
    log_capital = np.cumsum(np.log1p(lam * (bound - z)))
    return float(min(1.0, math.exp(-max(0.0, float(log_capital.max())))))


def pvalue(losses: np.ndarray, bound: float, method: str = "wsr", delta: float = 0.1) -> float:
    """The p-value of ``method`` (one of ``BOUNDS``) for ``H0: E[loss] > bound``."""
    if method == "wsr":
        return wsr_pvalue(losses, bound, delta)
    if method == "hb":
        return hb_pvalue(losses, bound)
    if method == "binomial":
        return binomial_pvalue(losses, bound)
    raise ValueError(f"unknown bound {method!r}; known: {', '.join(BOUNDS)}")


def fixed_sequence(pvalues: Iterable[float], delta: float) -> int:
    """How many hypotheses, tested in the given order, are rejected at level ``delta`` before the first that is not.

    Testing in a fixed order and stopping at the first failure controls the family-wise error rate at ``delta``
    without any correction; ``pvalues`` may be a lazy iterable, so later p-values need not be computed at all.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    count = 0
    for p in pvalues:
        if p > delta:
            break
        count += 1
    return count
