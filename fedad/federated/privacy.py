"""Differential privacy (conf/privacy): Flower's DP wrappers and mods, and the budget they spend."""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp.mod import LocalDpMod, adaptiveclipping_mod, fixedclipping_mod
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)

from fedad.config import Settings, checks, section
from fedad.config.resolvers import sampled_sites
from fedad.federated.task import run_settings

if TYPE_CHECKING:
    from flwr.serverapp.strategy.dp_adaptive_clipping import DifferentialPrivacyAdaptiveBase

log = logging.getLogger(__name__)

# Noise added by the server to the mean of clipped updates (central DP), with the sites
# clipping ("client...") or the server ("central...") and the norm fixed or adaptive.
FIXED = ("central", "client")
ADAPTIVE = ("central_adaptive", "client_adaptive")
CENTRAL = (*FIXED, *ADAPTIVE)
PRIVACY = ("none", *CENTRAL, "local")
# Each wrapper takes its own arguments (fixed: a clipping norm; adaptive: its clipping keys).
WRAPPERS: dict[str, Callable[..., Strategy]] = {
    "central": DifferentialPrivacyServerSideFixedClipping,
    "client": DifferentialPrivacyClientSideFixedClipping,
    "central_adaptive": DifferentialPrivacyServerSideAdaptiveClipping,
    "client_adaptive": DifferentialPrivacyClientSideAdaptiveClipping,
}
ADAPTIVE_KEYS = ("initial_clipping_norm", "target_clipped_quantile", "clip_norm_lr")
PARAMETERS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(FIXED, ("noise_multiplier", "clipping_norm", "delta")),
    **dict.fromkeys(
        ADAPTIVE, ("noise_multiplier", *ADAPTIVE_KEYS, "clipped_count_stddev", "delta")
    ),
    "local": ("epsilon", "clipping_norm", "delta"),
}
RANGES: dict[str, dict] = {
    "noise_multiplier": {"low": 0, "low_open": True},
    "clipping_norm": {"low": 0, "low_open": True},
    "initial_clipping_norm": {"low": 0, "low_open": True},
    "epsilon": {"low": 0, "low_open": True},
    "delta": {"low": 0, "high": 1, "low_open": True, "high_open": True},
    "target_clipped_quantile": {"low": 0, "high": 1},
    "clip_norm_lr": {"low": 0, "low_open": True},
    "clipped_count_stddev": {"low": 0, "low_open": True},
}
# The per-reply weight sites add under central DP: the server's mean then weighs every site
# alike, as the noise (and Flower's accountant) assume.
WEIGHT_KEY = "dp-weight"


def check_config(privacy_cfg: Mapping, strategy: str, model: str, sim: Mapping) -> list[str]:
    """What is wrong with a ``privacy`` config; empty when the run can apply it.

    Parameters
    ----------
    privacy_cfg : Mapping
        ``name`` plus the variant's own parameters.
    strategy : str
        The strategy's name: central DP is calibrated for FedAvg's mean.
    model : str
        The model's name, for the message.
    sim : Mapping
        The ``simulation`` settings.

    Returns
    -------
    list[str]
        One phrase per problem, naming the key.
    """
    # Imported here: the ClientApp imports this module, and needs no strategy (nor XGBoost).
    from fedad.federated.strategies import STRATEGIES, TREE_STRATEGIES

    name = privacy_cfg.get("name")
    if name not in PRIVACY:
        return [f"privacy must be one of {', '.join(PRIVACY)}, got {name!r}"]
    if name == "none":
        return []
    own = PARAMETERS[name]
    problems: list[str | None] = [
        f"privacy.{key} is not a parameter of {name} (it takes: {', '.join(own)})"
        for key in privacy_cfg
        if key not in ("name", *own)
    ]
    # clipped_count_stddev: null means Flower's default.
    present = {k: v for k, v in privacy_cfg.items() if v is not None or k != "clipped_count_stddev"}
    problems += [checks.number(present, key, "privacy", **RANGES[key]) for key in own]
    if strategy in TREE_STRATEGIES:
        problems.append(
            f"privacy={name} clips and noises model weights, but model={model} sends boosted "
            "trees, which have neither; use privacy=none with trees"
        )
    elif (
        name in CENTRAL
        and strategy in STRATEGIES
        and STRATEGIES[strategy].aggregate_train is not FedAvg.aggregate_train
    ):
        problems.append(
            f"privacy={name} calibrates its noise to a mean of clipped updates, where one site "
            f"moves the result by at most clipping_norm / sites; strategy={strategy} aggregates "
            "otherwise (a median, a selection, a server optimizer), so the noise would not give "
            "the stated guarantee: use strategy=fedavg or fedprox, or privacy=local"
        )
    if name in CENTRAL and float(sim.get("client_failure_rate", 0)) > 0:
        problems.append(
            f"privacy={name} cannot meet injected failures: Flower's DP wrappers skip a round's "
            "aggregation on any error reply (and calibrate the noise to every sampled site "
            "replying), so each round with a failing site would leave the model unchanged; set "
            "simulation.client_failure_rate=0"
        )
    if name in ADAPTIVE and not any(problems):
        stddev = privacy_cfg.get("clipped_count_stddev") or sampled_sites(sim) / 20
        if privacy_cfg["noise_multiplier"] >= 2 * stddev:
            problems.append(
                f"privacy.noise_multiplier={privacy_cfg['noise_multiplier']:g} must be below twice "
                f"the clipped-count noise ({stddev:g}; by default sampled sites / 20), which "
                "carries part of the budget under adaptive clipping; lower it, sample more sites "
                "or set privacy.clipped_count_stddev"
            )
    if importlib.util.find_spec("dp_accounting") is None:
        problems.append(
            f"privacy={name} reports its budget with Flower's RDP accountant, which needs the "
            "dp-accounting package: pip install 'fedad[dp]'"
        )
    return [p for p in problems if p]


def settings_of(settings: Settings) -> dict[str, Any]:
    """The run's privacy settings (``privacy.*``); ``{"name": "none"}`` when none are set."""
    return {"name": "none", **section(settings, "privacy")}


def noise_multiplier(privacy: Mapping) -> float:
    """The Gaussian noise of one round, in units of the sensitivity it protects.

    Central DP: ``noise_multiplier``. Local DP: what LocalDpMod's calibration
    ``sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon`` makes it.
    """
    if privacy["name"] == "local":
        return math.sqrt(2 * math.log(1.25 / float(privacy["delta"]))) / float(privacy["epsilon"])
    return float(privacy["noise_multiplier"])


def accountant(privacy: Mapping, population: int) -> Any:
    """Flower's RDP accountant for the run: site-level, add-or-remove, no amplification.

    fedad samples the sites of a round with the run's seed, which config.yaml and
    results.json hold, so amplification by sampling is not claimed.
    """
    from flwr.serverapp import (
        NeighboringRelation,
        PrivacyConfig,
        RdpAccountant,
        SamplingMethod,
    )

    return RdpAccountant(
        PrivacyConfig(
            target_delta=float(privacy["delta"]),
            population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )


def epsilon(privacy: Mapping, releases: int, population: int, sample: int) -> float:
    """The run's epsilon at ``privacy.delta`` after ``releases`` private rounds."""
    ledger = accountant(privacy, population)
    if releases:
        ledger.compose(event(privacy, population, sample), count=releases)
    return float(ledger.get_privacy_spent().epsilon)


def event(privacy: Mapping, population: int, sample: int) -> Any:
    """One round's release, as Flower's accountant composes it."""
    from flwr.serverapp import GaussianPrivacyEvent

    return GaussianPrivacyEvent(noise_multiplier(privacy), sample, population)


@contextmanager
def secret_noise() -> Iterator[None]:
    """Draw from NumPy's global generator seeded by the OS inside the block, then restore it.

    Flower's DP code draws its noise from ``np.random``, which the run's seed sets
    (Keras seeds it); noise anyone can recompute from the seed protects nothing.
    Restoring the state keeps the rest of the run as reproducible as before.
    """
    state = np.random.get_state()
    np.random.seed(None)
    try:
        yield
    finally:
        np.random.set_state(state)


class Private(Strategy):
    """The run's strategy under DP: Flower's wrapper, fedad's accounting and history fields.

    Central DP wraps ``strategy`` in Flower's wrapper (fixed clipping gets Flower's
    accountant, which composes each release itself); local DP leaves it as it is,
    the sites adding the noise. A round that releases a model composes one
    Gaussian event; a round of central DP with a failed or missing reply
    releases nothing (the model stays, no budget is spent).

    Parameters
    ----------
    strategy : Strategy
        The configured strategy (FedAvg's mean under central DP).
    privacy : Mapping
        The ``privacy`` settings.
    population, sample : int
        Sites in the federation, and sampled each round.
    """

    def __init__(self, strategy: Strategy, privacy: Mapping, population: int, sample: int) -> None:
        super().__init__()
        self.privacy = dict(privacy)
        self.name = str(privacy["name"])
        self.ledger = accountant(privacy, population)
        self.event = event(privacy, population, sample)
        self.releases = 0
        self.sampled = sample
        self.strategy = strategy
        if self.name in FIXED:
            self.strategy = WRAPPERS[self.name](
                strategy,
                float(privacy["noise_multiplier"]),
                float(privacy["clipping_norm"]),
                sample,
                accountant=self.ledger,
            )
        elif self.name in ADAPTIVE:
            self.strategy = WRAPPERS[self.name](
                strategy,
                float(privacy["noise_multiplier"]),
                sample,
                **{k: float(privacy[k]) for k in ADAPTIVE_KEYS},
                clipped_count_stddev=privacy.get("clipped_count_stddev"),
            )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's training messages; their number is the round's sample."""
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self.sampled = len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate under secret noise; count the release and compose its privacy event."""
        replies = list(replies)
        good = sum(not m.has_error() for m in replies)
        if self.name in CENTRAL and good != self.sampled:
            log.warning(
                "round %d: %d of the %d sampled sites replied; central DP releases no model this "
                "round (its noise is calibrated to every sampled site)",
                server_round,
                good,
                self.sampled,
            )
            return None, None
        with secret_noise():
            arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None:
            self.releases += 1
            if self.name not in FIXED:
                self.ledger.compose(self.event)
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's evaluation messages."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The wrapped strategy's aggregated evaluation metrics."""
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """Log the wrapped strategy's summary."""
        self.strategy.summary()

    def history_fields(self) -> dict[str, float]:
        """``epsilon`` so far, the ``dp_releases`` behind it, and an adaptive ``clipping_norm``."""
        fields = {
            "epsilon": float(self.ledger.get_privacy_spent().epsilon),
            "dp_releases": self.releases,
        }
        if self.name in ADAPTIVE:
            fields["clipping_norm"] = float(self._adaptive().clipping_norm)
        return fields

    def restore(self, row: Mapping[str, Any]) -> None:
        """Continue a resumed run's budget: replay its releases, take back its clipping norm."""
        self.releases = int(row.get("dp_releases", 0))
        if self.releases:
            self.ledger.compose(self.event, count=self.releases)
        if self.name in ADAPTIVE and "clipping_norm" in row:
            self._adaptive().clipping_norm = float(row["clipping_norm"])

    def _adaptive(self) -> DifferentialPrivacyAdaptiveBase:
        """The adaptive-clipping wrapper (``self.name in ADAPTIVE``), which owns the norm."""
        return cast("DifferentialPrivacyAdaptiveBase", self.strategy)


def describe(settings: Settings, history: list[Mapping] | None = None) -> dict[str, Any]:
    """The run's privacy for ``results.json``: its settings and the final epsilon."""
    privacy = settings_of(settings)
    if privacy["name"] == "none":
        return {"name": "none"}
    last = history[-1] if history else {}
    return {
        **privacy,
        "epsilon": float(last["epsilon"]) if "epsilon" in last else None,
        "releases": int(last["dp_releases"]) if "dp_releases" in last else None,
        "accounting": "RDP, site-level add-or-remove, no amplification by sampling",
    }


def label(privacy: Mapping) -> str | None:
    """What the comparison shows beside the federated model: ``ε = 3.2, δ = 1e-5``."""
    if privacy.get("name", "none") == "none" or privacy.get("epsilon") is None:
        return None
    return f"ε = {float(privacy['epsilon']):.3g}, δ = {float(privacy['delta']):g}"


def train_mod(defaults: Settings) -> Callable[[Message, Context, Callable], Message]:
    """The train handler's mod: Flower's client-side clipping or local DP, as the run says.

    It reads the run's settings at each message (``defaults`` under the
    Simulation Engine, the run config under ``flwr run``), so one ClientApp
    serves every privacy option. Under central DP it adds the reply weight
    :data:`WEIGHT_KEY`.
    """

    def mod(msg: Message, context: Context, call_next: Callable) -> Message:
        privacy = settings_of(run_settings(defaults, context.run_config))
        name = privacy["name"]
        if name == "client":
            reply = fixedclipping_mod(msg, context, call_next)
        elif name == "client_adaptive":
            reply = adaptiveclipping_mod(msg, context, call_next)
        elif name == "local":
            norm = float(privacy["clipping_norm"])
            local = LocalDpMod(norm, 2 * norm, float(privacy["epsilon"]), float(privacy["delta"]))
            with secret_noise():
                reply = local(msg, context, call_next)
        else:
            reply = call_next(msg, context)
        return _weighed(reply, name)

    return mod


def evaluate_mod(defaults: Settings) -> Callable[[Message, Context, Callable], Message]:
    """The evaluate handler's mod: the reply weight FedAvg checks under central DP."""

    def mod(msg: Message, context: Context, call_next: Callable) -> Message:
        name = settings_of(run_settings(defaults, context.run_config))["name"]
        return _weighed(call_next(msg, context), name)

    return mod


def _weighed(reply: Message, name: str) -> Message:
    if name in CENTRAL and not reply.has_error():
        for record in reply.content.metric_records.values():
            record[WEIGHT_KEY] = 1.0
    return reply
