"""Small binary tables from scikit-learn's generator, split and typed as the sites receive them."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.datasets import make_classification

from fedad.data.prepared import PreparedData


def binary_data(
    n_train: int,
    n_test: int,
    n_features: int,
    *,
    scale: tuple[float, float, float] | None = None,
    **generator: Any,
) -> PreparedData:
    """``make_classification`` rows: the first ``n_train`` to train on, the next ``n_test`` to test.

    Parameters
    ----------
    n_train, n_test : int
        Rows of each split, in the generator's order.
    n_features : int
        Columns, named ``f0``, ``f1``, ...
    scale : tuple of float, optional
        ``(low, high, offset)``: column ``i`` is multiplied by the ``i``-th of
        ``n_features`` evenly spaced factors from ``low`` to ``high`` and
        shifted by ``offset`` (off-centre, unequal scales, so that
        standardization matters).
    **generator
        Further arguments of ``make_classification`` (``n_informative``,
        ``weights``, ``class_sep``, ``flip_y``, ``random_state``, ...).
    """
    X, y = make_classification(n_samples=n_train + n_test, n_features=n_features, **generator)
    if scale is not None:
        low, high, offset = scale
        X = X * np.linspace(low, high, n_features) + offset
    X, y = X.astype(np.float32), y.astype(np.int64)
    return PreparedData(
        X_train=X[:n_train],
        y_train=y[:n_train],
        X_test=X[n_train:],
        y_test=y[n_train:],
        feature_names=[f"f{i}" for i in range(n_features)],
        class_names=["normal", "attack"],
        task="binary",
    )
