"""Bin edges of a histogram run: a pooled twin pinned to them, and the collective's bytes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import xgboost as xgb

from fedad import rundir

# Gradient and hessian per bin, as doubles: what each histogram's allreduce moves per bin.
BIN_BYTES = 16


def reference(indptr: np.ndarray, values: np.ndarray, max_bin: int) -> xgb.QuantileDMatrix:
    """A QuantileDMatrix whose bin edges are exactly ``indptr``, ``values``: a ``ref=`` for a twin.

    XGBoost's edges of a feature are its minimum's lower bound, the inner cuts,
    and an upper bound from its maximum (``get_quantile_cut``). A feature whose
    distinct values are a minimum, its inner cuts and a maximum sketches to
    exactly those edges when there are at most ``max_bin + 1`` of them, as
    there are; the minimum and maximum are recovered from the outer edges
    (:func:`_outer_value`), so the twin's rows need not be the sites' rows.

    Parameters
    ----------
    indptr, values : np.ndarray
        The edges of the federated run (rank 0's ``get_quantile_cut``).
    max_bin : int
        The run's ``model.max_bin``.

    Returns
    -------
    xgb.QuantileDMatrix
        Pass it as ``ref=`` (with the same ``max_bin``) to a QuantileDMatrix of the pooled rows.

    Raises
    ------
    ValueError
        If the reference does not reproduce the edges (a contract test pins it).
    """
    columns = []
    for f in range(len(indptr) - 1):
        edges = values[indptr[f] : indptr[f + 1]]
        inner = edges[1:-1]
        low = _outer_value(edges[0], -1, inner)
        high = _outer_value(edges[-1], 1, inner)
        if not len(inner):
            # No inner cut: a constant feature, whose one value one of the edges pins down.
            low = high = high if high != 0 else low
        columns.append(np.concatenate([[low], inner, [high]]))
    rows = max(len(c) for c in columns)
    # Repeating a value adds no distinct value: each column keeps its own edges.
    table = np.column_stack([np.pad(c, (0, rows - len(c)), mode="edge") for c in columns])
    ref = xgb.QuantileDMatrix(table.astype(np.float32), max_bin=int(max_bin))
    got_indptr, got_values = ref.get_quantile_cut()
    if not (np.array_equal(got_indptr, indptr) and np.array_equal(got_values, values)):
        raise ValueError("the pinned reference does not reproduce the federated bin edges")
    return ref


def _outer_value(edge: float, side: int, inner: np.ndarray) -> np.float32:
    """A minimum (``side`` -1) or maximum (+1) that XGBoost turns into the outer ``edge``.

    XGBoost computes in float32: lower edge = min - (|min| + 1e-5), upper edge =
    max + (|max| + 1e-5). A non-negative minimum gives -1e-5 whatever it is (0
    serves: the inner cuts lie above it); a non-positive maximum gives 1e-5 (the
    largest inner cut serves, or 0 without one).
    """
    eps = np.float32(1e-5)
    target = np.float32(edge)

    def edge_of(x: np.float32) -> np.float32:
        return np.float32(x + side * (np.abs(x) + eps))

    if target == edge_of(np.float32(0.0)):
        return np.float32(inner[-1]) if side > 0 and len(inner) else np.float32(0.0)
    guess = np.float32((target - side * eps) / 2)
    up = down = guess
    candidates = [guess]
    for _ in range(16):
        up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
        candidates += [up, down]
    return next((x for x in candidates if edge_of(x) == target), guess)


def histograms_built(trees: bytes, max_depth: int) -> int:
    """Gradient histograms the sites summed to grow ``trees`` (a booster's JSON).

    Per tree (and class): the root's, then one per split whose children may
    split again (their depth below ``max_depth``): XGBoost builds the smaller
    child's histogram and subtracts it from its parent's for the other. At
    most ``2^(max_depth-1)`` per tree.
    """
    model = json.loads(trees)["learner"]["gradient_booster"]["model"]
    built = 0
    for tree in model["trees"]:
        left, right = tree["left_children"], tree["right_children"]
        depth = {0: 0}
        built += 1
        for node in range(len(left)):
            if left[node] == -1:
                continue
            depth[left[node]] = depth[right[node]] = depth[node] + 1
            built += int(depth[node] + 1 < max_depth)
    return built


def collective_bytes(sites: int, histograms: int, bins: int) -> int:
    """Bytes the histogram allreduces move: sites x histograms x bins x 16 B x 2 directions.

    Neither XGBoost's server nor its communicator counts them; this is the
    payload alone (gRPC framing and the one quantile-sketch exchange of each
    session left out); ``scripts/bench_histogram.py`` checks it against the
    loopback interface's byte counters.
    """
    return int(sites) * int(histograms) * int(bins) * BIN_BYTES * 2


def bins_of(indptr: np.ndarray) -> int:
    """Bins of one histogram: each feature's edges less its lower bound."""
    return int(indptr[-1]) - (len(indptr) - 1)


def save(run_dir: Path, cuts: tuple[np.ndarray, np.ndarray], counts: list[int]) -> Path:
    """Write the last session's bin edges and pooled class counts: what pins the run's twin."""
    path = Path(run_dir) / rundir.PINNING_FILE
    with rundir.atomic(path) as f:
        np.savez(f, indptr=cuts[0], values=cuts[1], counts=np.asarray(counts, dtype=np.int64))
    return path


def load(run_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(indptr, values, counts)`` of a histogram run's pins file; None if it has none."""
    path = Path(run_dir) / rundir.PINNING_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as pins:
        return pins["indptr"], pins["values"], pins["counts"]
