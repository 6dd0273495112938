"""Flower strategies by config name, with NaN-aware aggregation of client metrics."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedXgbBagging,
    FedXgbCyclic,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
    Strategy,
)

from fedad.config import checks
from fedad.errors import FedadError
from fedad.federated.fednova import FedNova
from fedad.federated.histogram.strategy import FedXgbHistogram
from fedad.federated.scaffold import Scaffold
from fedad.models import booster
from fedad.models.catalog import family


class FedXgbBaggingAll(FedXgbBagging):
    """Flower's FedXgbBagging, appending every tree of every reply, weighted by its examples.

    Flower's ``aggregate_bagging`` appends ``num_parallel_tree`` trees per reply
    and sums the sites' updates; this appends all of a reply's trees (every
    local boosting round, every class's tree) with leaves scaled by the
    site's share of the round's examples (:func:`fedad.models.booster.merge`).
    Replies with an error are left out (counted by the grid).
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Merge the replies' trees into the global booster; average their metrics."""
        good = [m for m in replies if not m.has_error()]
        if not good or self.current_bst is None:
            return None, None
        contents = [m.content for m in good]
        # The weight is a count (a scalar); Flower types a metric as a scalar or a list.
        weights = [
            float(cast(float, c.metric_records["metrics"][self.weighted_by_key])) for c in contents
        ]
        total = sum(weights) or float(len(weights))
        merged = self.current_bst
        for content, weight in zip(contents, weights, strict=True):
            trees = booster.from_array(cast(ArrayRecord, content["arrays"])["0"].numpy())
            merged = booster.merge(merged, trees, (weight or 1.0) / total)
        self.current_bst = merged
        return ArrayRecord([np.frombuffer(merged, dtype=np.uint8)]), self.train_metrics_aggr_fn(
            contents, self.weighted_by_key
        )


STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedavgm": FedAvgM,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "multikrum": MultiKrum,
    "bulyan": Bulyan,
    "qfedavg": QFedAvg,
    "scaffold": Scaffold,
    "fednova": FedNova,
    "fedxgb_bagging": FedXgbBaggingAll,
    "fedxgb_cyclic": FedXgbCyclic,
    "fedxgb_histogram": FedXgbHistogram,
}
# Strategies for boosted trees (the global model is a booster, not averaged weights).
TREE_STRATEGIES = ("fedxgb_bagging", "fedxgb_cyclic", "fedxgb_histogram")
# Ranges of the strategies' own parameters (types come from the Flower class's defaults).
RANGES: dict[str, dict] = {
    "proximal_mu": {"low": 0},
    "eta": {"low": 0, "low_open": True},
    "eta_l": {"low": 0, "low_open": True},
    "tau": {"low": 0, "low_open": True},
    "beta_1": {"low": 0, "high": 1, "high_open": True},
    "beta_2": {"low": 0, "high": 1, "high_open": True},
    "server_learning_rate": {"low": 0, "low_open": True},
    "server_momentum": {"low": 0, "high": 1, "high_open": True},
    "beta": {"low": 0, "high": 0.5, "high_open": True},
    "num_malicious_nodes": {"whole": True, "low": 0},
    "num_nodes_to_select": {"whole": True, "low": 1},
    "q": {"low": 0},
    "client_learning_rate": {"low": 0, "low_open": True},
    "port": {"whole": True, "low": 0, "high": 65535, "hint": "0 probes a free port every round"},
    "session_timeout": {"low": 0, "low_open": True},
}
# Settings fedad passes to every strategy itself (not configurable per strategy).
FEDAD_ARGUMENTS = (
    "fraction_train",
    "fraction_evaluate",
    "min_train_nodes",
    "min_evaluate_nodes",
    "min_available_nodes",
    "evaluate_metrics_aggr_fn",
)


def check_config(strategy_cfg: Mapping, replies: int, model: str | None = None) -> list[str]:
    """What is wrong with a ``strategy`` config; empty when Flower can run it.

    Parameters
    ----------
    strategy_cfg : Mapping
        ``name`` plus the strategy's own parameters.
    replies : int
        Training replies a round can expect (sites sampled, less those made to
        fail): the robust aggregators' bounds on assumed attackers depend on it.
    model : str, optional
        The model's name: trees need a FedXgb strategy, weights any other.

    Returns
    -------
    list[str]
        One phrase per problem, naming the key.
    """
    name = strategy_cfg.get("name")
    if name not in STRATEGIES:
        return [f"strategy must be one of {', '.join(STRATEGIES)}, got {name!r}"]
    signature = inspect.signature(STRATEGIES[name].__init__).parameters
    problems: list[str | None] = []
    for key in strategy_cfg:
        if key == "name":
            continue
        if key not in signature or key in FEDAD_ARGUMENTS:
            known = [k for k in signature if k not in (*FEDAD_ARGUMENTS, "self")]
            problems.append(
                f"strategy.{key} is not a parameter of {name} (it takes: "
                f"{', '.join(known) or 'none'})"
            )
            continue
        default = signature[key].default
        if isinstance(default, str) and not (isinstance(value := strategy_cfg[key], str) and value):
            problems.append(f"strategy.{key} must be a non-empty text, got {value!r}")
        elif isinstance(default, bool):
            problems.append(checks.flag(strategy_cfg, key, "strategy"))
        elif isinstance(default, int | float) or key in RANGES:
            rules = RANGES.get(key, {"whole": isinstance(default, int)})
            problems.append(checks.number(strategy_cfg, key, "strategy", **rules))
    problems.append(byzantine_bound(name, strategy_cfg, replies))
    if model is not None and (family(model) == "booster") != (name in TREE_STRATEGIES):
        if family(model) == "booster":
            why, fits = "boosted trees are merged, not averaged", " or ".join(TREE_STRATEGIES)
        else:
            why, fits = "FedXgb strategies merge boosters, not weights", "one without fedxgb"
        problems.append(f"strategy={name} does not fit model={model} ({why}): use {fits}")
    return [p for p in problems if p]


def byzantine_bound(name: str, strategy_cfg: Mapping, replies: int) -> str | None:
    """The robust aggregators' bound on the attackers they assume, against the replies.

    Returns what is wrong, or None when the bound holds (or the strategy has none).
    """
    attackers = strategy_cfg.get("num_malicious_nodes")
    if not isinstance(attackers, int) or isinstance(attackers, bool):
        return None
    bounds = {"krum": (2, 3), "multikrum": (2, 3), "bulyan": (4, 3)}
    if name not in bounds:
        return None
    factor, extra = bounds[name]
    if replies >= factor * attackers + extra:
        return None
    return (
        f"{name} tolerates f attackers among n replies only when n >= {factor}f + {extra}, but "
        f"strategy.num_malicious_nodes={attackers} with {replies} expected replies per round "
        "(by default it is the true number of malicious sites, floor(attack.fraction x sites)); "
        "lower the share or the assumed count, or sample more sites"
    )


def build_strategy(
    strategy_cfg: Mapping,
    fraction_train: float,
    fraction_evaluate: float,
    min_clients: int,
    weight_key: str | None = None,
) -> Strategy:
    """Instantiate the Flower strategy named in ``strategy_cfg``.

    Parameters
    ----------
    strategy_cfg : Mapping
        ``name`` plus the strategy's own parameters (``proximal_mu``, ``eta``,
        ``server_momentum``, ``beta``, ``num_malicious_nodes`` ...), passed to
        the Flower class as keyword arguments.
    fraction_train, fraction_evaluate : float
        Share of clients sampled for training and for evaluation each round.
    min_clients : int
        Least number of clients sampled, and connected before a round starts.
    weight_key : str, optional
        Weigh each site's model by this reply metric instead of its examples
        (central DP: a weight of 1 per site); the clients' metrics are still
        averaged by their examples.

    Returns
    -------
    Strategy
        Client evaluation metrics are averaged with :func:`weighted_mean`.

    Raises
    ------
    FedadError
        If the name is unknown or a parameter is not accepted.
    """
    params = {k: v for k, v in strategy_cfg.items() if k != "name"}
    name = strategy_cfg.get("name")
    if name not in STRATEGIES:
        raise FedadError(
            f"Unknown strategy '{name}'. Set strategy= to one of: {', '.join(STRATEGIES)}."
        )
    cls = STRATEGIES[name]
    accepted = inspect.signature(cls.__init__).parameters
    # FedXgbCyclic trains one site a round and takes no minimum of train or evaluate nodes.
    arguments: dict[str, Any] = {
        "fraction_train": fraction_train,
        "fraction_evaluate": fraction_evaluate,
        "min_train_nodes": min_clients,
        "min_evaluate_nodes": min_clients,
        "min_available_nodes": min_clients,
        "evaluate_metrics_aggr_fn": weighted_mean,
    }
    if weight_key is not None:
        by_examples = by_examples_ignoring(weight_key)
        arguments.update(
            weighted_by_key=weight_key,
            train_metrics_aggr_fn=by_examples,
            evaluate_metrics_aggr_fn=by_examples,
        )
    try:
        return cls(**{k: v for k, v in arguments.items() if k in accepted}, **params)
    except (TypeError, ValueError) as error:
        raise FedadError(
            f"Strategy '{name}' does not accept the parameters {params}: {error}. "
            f"Check conf/strategy/{name}.yaml and your strategy.* overrides."
        ) from error


def by_examples_ignoring(weight_key: str) -> Callable[[list[RecordDict], str], MetricRecord]:
    """A metrics aggregation that weighs by ``num-examples`` whatever key the strategy weighs by.

    ``weight_key`` (the models' weight) is left out of the result.
    """

    def aggregate(records: list[RecordDict], _: str) -> MetricRecord:
        return weighted_mean(records, "num-examples", ignore=(weight_key,))

    return aggregate


def weighted_mean(
    records: list[RecordDict], weight_key: str, ignore: Sequence[str] = ()
) -> MetricRecord:
    """Average each metric over the replies that define it, weighted by ``weight_key``.

    A metric undefined at a site (ROC-AUC on a test slice with one class) is
    sent as NaN; Flower's default average would turn the whole round's value
    into NaN, so those sites are left out of that metric's average instead.
    List-valued metrics are counts and are summed.

    Parameters
    ----------
    records : list[RecordDict]
        Reply contents, each with one MetricRecord.
    weight_key : str
        The metric holding the number of examples behind each reply.
    ignore : Sequence[str]
        Metrics left out of the result, as ``weight_key`` is.

    Returns
    -------
    MetricRecord
        One value per metric (NaN where no site defines it), without ``weight_key``.
    """
    # Any values: a metric is a scalar or, for a list-valued count, a list (checked below).
    metrics: list[Mapping[str, Any]] = [next(iter(r.metric_records.values())) for r in records]
    out = MetricRecord()
    for key in metrics[0] if metrics else []:
        if key == weight_key or key in ignore:
            continue
        if isinstance(metrics[0][key], list):
            # Counts (the autoencoder's error histograms) add up over the sites.
            out[key] = np.sum([np.asarray(m[key]) for m in metrics], axis=0).tolist()
            continue
        pairs = [
            (float(m[weight_key]), float(m[key])) for m in metrics if not math.isnan(float(m[key]))
        ]
        total = sum(w for w, _ in pairs)
        out[key] = sum(w * v for w, v in pairs) / total if total > 0 else math.nan
    return out
