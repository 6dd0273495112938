"""Gradient-boosted trees (XGBoost) for federated sites: local boosting, tree merging, scores."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np
import xgboost as xgb

# Sites start from a margin of 0 (probability 0.5) rather than each estimating its own
# base score from its skewed shard: trees from different sites then add up consistently.
BASE_SCORE = 0.5
# XGBoost's own default number of bins per feature (``model.max_bin`` absent).
MAX_BIN = 256


def params(model_cfg: Mapping, n_classes: int, seed: int, threads: int = 1) -> dict:
    """XGBoost training parameters from a ``model=xgboost`` config.

    Parameters
    ----------
    model_cfg : Mapping
        ``max_depth``, ``learning_rate`` (the shrinkage eta), ``max_bin``.
    n_classes : int
        2 (``binary:logistic``) or more (``multi:softprob``).
    seed : int
        XGBoost's seed.
    threads : int
        Threads per site.

    Returns
    -------
    dict
    """
    out = {
        "max_depth": int(model_cfg.get("max_depth", 6)),
        "eta": float(model_cfg.get("learning_rate", 0.1)),
        "tree_method": "hist",
        "max_bin": int(model_cfg.get("max_bin", MAX_BIN)),
        "base_score": BASE_SCORE,
        "nthread": int(threads),
        "seed": int(seed),
        "verbosity": 0,
    }
    if n_classes == 2:
        out["objective"] = "binary:logistic"
    else:
        out.update(objective="multi:softprob", num_class=int(n_classes))
    return out


def train(
    start: bytes,
    X: np.ndarray,
    y: np.ndarray,
    train_params: Mapping,
    rounds: int,
    class_weights: bool = True,
) -> xgb.Booster:
    """Boost ``rounds`` more iterations on ``X, y``, from the model ``start`` (empty: from scratch).

    With ``class_weights`` the classes of these rows are reweighted to balance
    (:func:`weighting` of their own counts).
    """
    local, weight = dict(train_params), None
    if class_weights and len(y):
        extra, weight = weighting(y, np.bincount(y), local["objective"])
        local.update(extra)
    dtrain = xgb.DMatrix(X, label=y, weight=weight)
    booster = load(start) if start else None
    return xgb.train(local, dtrain, num_boost_round=int(rounds), xgb_model=booster)


def weighting(
    y: np.ndarray, counts: Sequence[int] | np.ndarray, objective: str
) -> tuple[dict, np.ndarray | None]:
    """Balanced class weights from class ``counts``: extra parameters, or per-row weights.

    Binary: ``scale_pos_weight`` = negatives / positives (1 without both);
    multiclass: each row weighs ``n / (k * n_class)`` over the ``k`` classes
    present (scikit-learn's ``balanced``). A site's own counts (:func:`train`),
    or the pooled counts of a histogram session's sites, the same at every site
    and for the twin: XGBoost does not check that sites agree.

    Returns
    -------
    tuple
        ``({"scale_pos_weight": w}, None)`` or ``({}, row weights of y)``.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if objective == "binary:logistic":
        negatives, positives = counts[0], (counts[1] if len(counts) > 1 else 0.0)
        return {"scale_pos_weight": negatives / positives if positives and negatives else 1.0}, None
    present = counts > 0
    per_class = np.zeros(len(counts))
    per_class[present] = counts.sum() / (present.sum() * counts[present])
    return {}, per_class[np.asarray(y)]


def load(raw: bytes) -> xgb.Booster:
    """A booster from its JSON bytes."""
    booster = xgb.Booster()
    booster.load_model(bytearray(raw))
    return booster


def to_bytes(booster: xgb.Booster) -> bytes:
    """A booster's JSON bytes: what travels between the sites and the server."""
    return bytes(booster.save_raw("json"))


def last_rounds(booster: xgb.Booster, rounds: int) -> bytes:
    """The trees of the last ``rounds`` boosting iterations (all classes), as JSON bytes."""
    total = booster.num_boosted_rounds()
    return to_bytes(booster[max(total - rounds, 0) : total])


def merge(base: bytes, trees: bytes, weight: float) -> bytes:
    """Append every tree of ``trees`` to ``base``, its leaf values scaled by ``weight``.

    Each site boosts from the same global model; appending all sites' trees
    with weights summing to 1 adds their example-weighted mean update (FedAvg
    in function space), where Flower's plain bagging would add their sum, and
    keeps every boosting iteration and every class's tree of a reply (Flower's
    ``aggregate_bagging`` appends ``num_parallel_tree`` trees per reply only).

    Parameters
    ----------
    base : bytes
        The global model's JSON, or ``b""`` for none yet.
    trees : bytes
        A site's new trees (:func:`last_rounds`).
    weight : float
        The site's share of the round's examples.

    Returns
    -------
    bytes
        The merged model's JSON.
    """
    new = json.loads(trees)
    new_model = new["learner"]["gradient_booster"]["model"]
    for tree in new_model["trees"]:
        leaves = [i for i, left in enumerate(tree["left_children"]) if left == -1]
        for i in leaves:
            tree["split_conditions"][i] *= weight
            tree["base_weights"][i] *= weight
    if not base:
        return json.dumps(new).encode()
    merged = json.loads(base)
    model = merged["learner"]["gradient_booster"]["model"]
    offset = len(model["trees"])
    for i, tree in enumerate(new_model["trees"]):
        tree["id"] = offset + i
        model["trees"].append(tree)
    model["tree_info"].extend(new_model["tree_info"])
    indptr = new_model["iteration_indptr"]
    model["iteration_indptr"].extend(offset + p for p in indptr[1:])
    model["gbtree_model_param"]["num_trees"] = str(len(model["trees"]))
    return json.dumps(merged).encode()


def probabilities(booster: xgb.Booster, X: np.ndarray, n_classes: int) -> np.ndarray:
    """Class probabilities ``(n, n_classes)``; an empty model gives the base score's."""
    if len(X) == 0:
        return np.zeros((0, n_classes))
    p = booster.predict(xgb.DMatrix(X)).astype(np.float64)
    return np.column_stack([1.0 - p, p]) if n_classes == 2 else p.reshape(len(X), n_classes)


def as_array(raw: bytes) -> np.ndarray:
    """JSON bytes as the uint8 array an ArrayRecord carries."""
    return np.frombuffer(raw, dtype=np.uint8)


def from_array(array: np.ndarray) -> bytes:
    """The JSON bytes an ArrayRecord's uint8 array holds."""
    return np.asarray(array, dtype=np.uint8).tobytes()
