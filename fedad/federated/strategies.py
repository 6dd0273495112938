"""Flower strategies by config name, with NaN-aware aggregation of client metrics."""

from __future__ import annotations

import math
from collections.abc import Mapping

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from fedad.errors import FedadError

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
}


def build_strategy(
    strategy_cfg: Mapping,
    fraction_train: float,
    fraction_evaluate: float,
    min_clients: int,
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
    try:
        return STRATEGIES[name](
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_clients,
            min_evaluate_nodes=min_clients,
            min_available_nodes=min_clients,
            evaluate_metrics_aggr_fn=weighted_mean,
            **params,
        )
    except (TypeError, ValueError) as error:
        raise FedadError(
            f"Strategy '{name}' does not accept the parameters {params}: {error}. "
            f"Check conf/strategy/{name}.yaml and your strategy.* overrides."
        ) from error


def weighted_mean(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Average each metric over the replies that define it, weighted by ``weight_key``.

    A metric undefined at a site (ROC-AUC on a test slice with one class) is
    sent as NaN; Flower's default average would turn the whole round's value
    into NaN, so those sites are left out of that metric's average instead.

    Parameters
    ----------
    records : list[RecordDict]
        Reply contents, each with one MetricRecord.
    weight_key : str
        The metric holding the number of examples behind each reply.

    Returns
    -------
    MetricRecord
        One value per metric (NaN where no site defines it), without ``weight_key``.
    """
    metrics = [next(iter(r.metric_records.values())) for r in records]
    out = MetricRecord()
    for key in metrics[0] if metrics else []:
        if key == weight_key:
            continue
        pairs = [
            (float(m[weight_key]), float(m[key])) for m in metrics if not math.isnan(float(m[key]))
        ]
        total = sum(w for w, _ in pairs)
        out[key] = sum(w * v for w, v in pairs) / total if total > 0 else math.nan
    return out
