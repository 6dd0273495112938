"""Feature standardization from per-site sums, so no raw row has to leave a site."""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import numpy as np

SiteSums = tuple[int, np.ndarray, np.ndarray]
# How sites standardize: with pooled statistics from every site, or each with its own.
SCALINGS = ("federated", "local")


def site_sums(X: np.ndarray) -> SiteSums:
    """Return the count, per-feature sum and per-feature sum of squares of ``X``.

    Parameters
    ----------
    X : np.ndarray
        Feature rows of shape ``(n, n_features)``.

    Returns
    -------
    tuple[int, np.ndarray, np.ndarray]
        ``(n, sum, sum_of_squares)``; the sums are ``float64``.
    """
    x = np.asarray(X, dtype=np.float64)
    return x.shape[0], x.sum(axis=0), np.square(x).sum(axis=0)


def pooled_moments(sums: Iterable[SiteSums]) -> tuple[np.ndarray, np.ndarray]:
    """Combine per-site sums into the mean and standard deviation of the pooled rows.

    Parameters
    ----------
    sums : Iterable[tuple[int, np.ndarray, np.ndarray]]
        One :func:`site_sums` result per site.

    Returns
    -------
    mean, std : np.ndarray
        ``float64`` per-feature mean and population standard deviation (as
        scikit-learn's ``StandardScaler``); a constant feature gets ``std = 1``
        so that it scales to zero rather than to NaN.
    """
    sums = list(sums)
    n = sum(count for count, _, _ in sums)
    if n == 0:
        raise ValueError("cannot standardize with statistics of zero rows")
    # sum() starts from 0, hence its int | array type; with a site it is an array.
    mean = cast(np.ndarray, sum(s for _, s, _ in sums) / n)
    # float64 sums keep E[x^2] - E[x]^2 accurate for log-transformed features;
    # the clip absorbs the rounding of an (almost) constant column.
    var = np.clip(sum(q for _, _, q in sums) / n - np.square(mean), 0.0, None)
    std = np.sqrt(var)
    std[std == 0.0] = 1.0
    return mean, std


def standardize(X: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Return ``(X - mean) / std`` as ``float32``."""
    return ((np.asarray(X, dtype=np.float64) - mean) / std).astype(np.float32)
