"""Secure aggregation with Flower's SecAgg+ (``secure_aggregation=secaggplus``): settings, checks.

The legacy Flower API that SecAgg+ needs in flwr 1.42 stays in this package:
:mod:`fedad.federated.secagg.server` (the round loop, ``SecAggPlusWorkflow``) and
:mod:`fedad.federated.secagg.client` (the ClientApp with ``secaggplus_mod``).
This module imports neither, so the settings can be checked before Flower loads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, cast

from fedad.config import Scalar, checks, section, to_dict
from fedad.config.resolvers import sampled_sites
from fedad.errors import FedadError

NAMES = ("none", "secaggplus")
# Flower's four SecAgg+ stages, in order (flwr.common.secure_aggregation.secaggplus_constants).
STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")
# Flower's modulus: every masked sum is taken modulo 2^32.
MODULUS = 2**32
# The strategies whose aggregate is the examples-weighted mean SecAgg+ computes.
WEIGHTED_MEAN = ("fedavg", "fedprox")
ROBUST = ("krum", "multikrum", "bulyan", "fedmedian", "fedtrimmedavg")


def run_settings(cfg: Mapping) -> dict[str, Scalar]:
    """The apps' ``secure_aggregation.*`` settings of a composed config (``name`` only when off).

    Kept apart from :func:`fedad.config.make_settings`: the Deployment Engine's run config does
    not declare them, and SecAgg+ runs on the Simulation Engine only.
    """
    group = to_dict(cfg["secure_aggregation"]) if "secure_aggregation" in cfg else {}
    if group.get("name", "none") == "none":
        return {"secure_aggregation.name": "none"}
    return {f"secure_aggregation.{k}": v for k, v in group.items() if v is not None}


def round_loop(rounds: Any, settings: Mapping[str, Any]) -> Callable[..., Any]:
    """The run's round loop: ``rounds.start``, or under SecAgg+ the SecAgg+ loop around ``rounds``.

    Both take ``Strategy.start``'s keyword arguments
    (:func:`fedad.federated.secagg.server.run_rounds`).
    """
    if not on(settings):
        return cast(Callable[..., Any], rounds.start)
    # Imported here: the settings checks above need no legacy Flower server.
    from fedad.federated.secagg.server import run_rounds

    return partial(run_rounds, rounds, settings)


def on(settings: Mapping[str, Any]) -> bool:
    """Whether the run's flat settings ask for SecAgg+."""
    return settings.get("secure_aggregation.name", "none") == "secaggplus"


def check_config(
    secagg: Mapping,
    strategy: str,
    model: str,
    privacy: str,
    sim: Mapping,
    personalize: str = "none",
) -> list[str]:
    """What is wrong with a ``secure_aggregation`` config, or what it cannot combine with.

    Parameters
    ----------
    secagg : Mapping
        ``name`` plus SecAgg+'s settings.
    strategy, model, privacy : str
        The names of the run's strategy, model and privacy option.
    sim : Mapping
        The ``simulation`` settings.
    personalize : str
        The name of the run's ``personalize`` option.

    Returns
    -------
    list[str]
        One paragraph-sized phrase per problem.
    """
    name = secagg.get("name", "none")
    if name not in NAMES:
        return [f"secure_aggregation must be one of {', '.join(NAMES)}, got {name!r}"]
    if name == "none":
        return []
    where = "secure_aggregation"
    shares = secagg.get("num_shares")
    problems: list[str | None] = [
        checks.number(secagg, "reconstruction_threshold", where, whole=True, low=2),
        checks.number(secagg, "max_weight", where, low=0, low_open=True),
        checks.number(secagg, "clipping_range", where, low=0, low_open=True),
        checks.number(secagg, "quantization_range", where, whole=True, low=2, high=MODULUS - 1),
        checks.choice(secagg, "failure_stage", where, STAGES),
        None
        if secagg.get("timeout") is None
        else checks.number(secagg, "timeout", where, low=0, low_open=True),
    ]
    if isinstance(shares, float) and not isinstance(shares, bool):
        problems.append(checks.number(secagg, "num_shares", where, low=0, high=1, low_open=True))
    else:
        problems.append(checks.number(secagg, "num_shares", where, whole=True, low=3))
    if any(problems):
        return [p for p in problems if p]
    sampled = sampled_sites(sim)
    threshold = int(secagg["reconstruction_threshold"])
    if threshold > sampled:
        problems.append(
            f"secure_aggregation.reconstruction_threshold={threshold} is above the {sampled} "
            "sites a round samples (simulation.num_clients x simulation.fraction_train): no "
            "round could rebuild the masks; lower it or sample more sites"
        )
    if isinstance(shares, int) and not threshold < shares <= sampled:
        problems.append(
            f"secure_aggregation.num_shares={shares} must exceed reconstruction_threshold="
            f"{threshold} and be at most the {sampled} sites a round samples (or a share of "
            "them in (0, 1], such as 1.0)"
        )
    if sampled * int(secagg["quantization_range"]) >= MODULUS:
        problems.append(
            f"{sampled} sampled sites x secure_aggregation.quantization_range="
            f"{secagg['quantization_range']} reach SecAgg+'s modulus 2^32, so the masked sum "
            "would wrap around; lower quantization_range"
        )
    problems += _combinations(strategy, model, privacy)
    if personalize != "none":
        problems.append(
            f"personalize={personalize} trains each site's personal model in fedad's own train "
            "handler, which the SecAgg+ ClientApp (fedad.federated.secagg.client) does not run "
            "yet: use personalize=none with secure_aggregation=secaggplus"
        )
    return [p for p in problems if p]


def _combinations(strategy: str, model: str, privacy: str) -> list[str]:
    """The settings SecAgg+ cannot run beside, one phrase each."""
    problems = []
    if model == "xgboost":
        problems.append(
            "secure_aggregation=secaggplus sums model arrays, but model=xgboost sends boosted "
            "trees (or histograms), which cannot be added up under masks; use a Keras model "
            "(cnn, mlp, logistic, autoencoder) or secure_aggregation=none"
        )
    elif strategy in ROBUST:
        problems.append(
            f"secure_aggregation=secaggplus hides each site's update from the server, but "
            f"strategy={strategy} needs every site's update on its own (to rank, trim or pick "
            "them); the two exclude each other: use strategy=fedavg or fedprox, or "
            "secure_aggregation=none"
        )
    elif strategy not in WEIGHTED_MEAN:
        problems.append(
            f"secure_aggregation=secaggplus runs Flower's legacy SecAgg+ workflow, whose result "
            f"is the examples-weighted mean of the updates; strategy={strategy} applies its own "
            "server step (an optimizer, momentum or a fairness weighting) that fedad does not "
            "run on a masked sum yet: use strategy=fedavg or fedprox"
        )
    if privacy in ("central", "central_adaptive", "client", "client_adaptive"):
        problems.append(
            f"privacy={privacy} adds its noise at the server to the clear updates (and clips "
            "them there or with a mod on Flower's Message API); distributed DP, with the noise "
            "added by the sites under SecAgg+, is not supported yet: use privacy=none with "
            "secure_aggregation=secaggplus"
        )
    elif privacy == "local":
        problems.append(
            "privacy=local noises the update with Flower's LocalDpMod, which reads the Message "
            "API's records, while SecAgg+ sends the legacy FitIns records: the two do not "
            "combine in flwr 1.42; use privacy=none with secure_aggregation=secaggplus"
        )
    return problems


def check_sites(settings: Mapping[str, Any], rows: Sequence[int]) -> None:
    """Refuse a run whose largest site holds more rows than ``max_weight`` (before Ray starts).

    Parameters
    ----------
    settings : Mapping
        The run's flat settings.
    rows : Sequence[int]
        Each site's shard rows (an upper bound of the examples it trains on).

    Raises
    ------
    FedadError
        When SecAgg+ is on and a site's weight would overflow.
    """
    if not on(settings) or not rows:
        return
    limit = float(section(settings, "secure_aggregation")["max_weight"])
    largest = max(rows)
    if largest > limit:
        raise FedadError(
            f"Cannot start the run: secure_aggregation.max_weight={limit:g} is below the "
            f"{largest} rows of the largest site; SecAgg+ scales each update by its rows / "
            "max_weight before clipping it to clipping_range, so that site's update would "
            f"overflow and be clipped: set secure_aggregation.max_weight={largest} or more."
        )
