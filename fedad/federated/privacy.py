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
from fedad.federated import budget
from fedad.federated.budget import SLOPE, TARGET, accountant, event, noise_multiplier
from fedad.federated.stopping import StopTraining
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
    **dict.fromkeys(FIXED, ("noise_multiplier", "clipping_norm", "delta", TARGET)),
    **dict.fromkeys(
        ADAPTIVE, ("noise_multiplier", *ADAPTIVE_KEYS, "clipped_count_stddev", "delta", TARGET)
    ),
    "local": ("epsilon", "clipping_norm", "delta", TARGET),
}
RANGES: dict[str, dict] = {
    TARGET: {"low": 0, "low_open": True},
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
    # Null: Flower's default clipped_count_stddev, no target, or the noise left to the target.
    optional = ("clipped_count_stddev", TARGET, budget.knob(name))
    present = {k: v for k, v in privacy_cfg.items() if v is not None or k not in optional}
    problems += [checks.number(present, key, "privacy", **RANGES[key]) for key in own]
    # Without dp-accounting no target can be calibrated (the last check says so).
    accounting = importlib.util.find_spec("dp_accounting") is not None
    if not any(problems) and accounting:
        problems.append(_target_problem(privacy_cfg, sim))
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
    if name in ADAPTIVE and not any(problems) and (accounting or privacy_cfg.get(TARGET) is None):
        stddev = privacy_cfg.get("clipped_count_stddev") or sampled_sites(sim) / 20
        noise = budget.resolve(privacy_cfg, sim["num_rounds"])["noise_multiplier"]
        if noise >= 2 * stddev:
            targeted = privacy_cfg.get(TARGET) is not None
            fix = "raise the target, train fewer rounds" if targeted else "lower it"
            chosen = (
                f"privacy.{TARGET}={privacy_cfg[TARGET]:g} over simulation.num_rounds="
                f"{sim['num_rounds']} needs noise_multiplier {noise:.4g}"
                if targeted
                else f"privacy.noise_multiplier={noise:g} is set"
            )
            problems.append(
                f"{chosen}, but adaptive clipping needs it below twice the clipped-count noise "
                f"({stddev:g}; by default sampled sites / 20), which carries part of the budget; "
                f"{fix}, sample more sites or set privacy.clipped_count_stddev"
            )
    if not accounting:
        problems.append(
            f"privacy={name} reports its budget with Flower's RDP accountant, which needs the "
            "dp-accounting package: pip install 'fedad[dp]'"
        )
    return [p for p in problems if p]


def _target_problem(privacy_cfg: Mapping, sim: Mapping) -> str | None:
    """What is wrong with ``privacy.target_epsilon`` beside the noise it would set."""
    target, key = privacy_cfg.get(TARGET), budget.knob(str(privacy_cfg["name"]))
    if target is None:
        return None
    if privacy_cfg.get(key) is not None:
        return (
            f"privacy.{TARGET}={target:g} and privacy.{key}={privacy_cfg[key]:g} are both set, "
            f"but the target picks {key} itself (the least noise whose planned rounds spend at "
            f"most epsilon {target:g}): keep one of them"
        )
    rounds = int(sim["num_rounds"])
    if budget.calibrate(float(target), float(privacy_cfg["delta"]), rounds) is None:
        return (
            f"privacy.{TARGET}={target:g} cannot be met over simulation.num_rounds={rounds} at "
            f"privacy.delta={privacy_cfg['delta']:g}: even a noise multiplier of "
            f"{budget.HIGHEST:g} spends more; raise the target or delta, or train fewer rounds"
        )
    return None


def settings_of(settings: Settings) -> dict[str, Any]:
    """The run's privacy settings (``privacy.*``), the noise resolved; ``{"name": "none"}``.

    Without a knob (``noise_multiplier``, local DP's ``epsilon``) the noise is
    what ``target_epsilon`` calls for over ``simulation.num_rounds``, or the
    option's default (:func:`fedad.federated.budget.resolve`): both apps and
    ``results.json`` see the same number.
    """
    privacy = {"name": "none", **section(settings, "privacy")}
    return budget.resolve(privacy, int(settings.get("simulation.num_rounds", 1)))


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
        self.population = population
        self.target = None if privacy.get(TARGET) is None else float(privacy[TARGET])
        self.releases = 0
        # The releases' summed RDP slope: what a resumed run replays (budget.slope).
        self.slope = 0.0
        if self.target is not None:
            local = f" (per-round epsilon {privacy['epsilon']:.4g})" if self.name == "local" else ""
            log.info(
                "privacy budget: noise multiplier %.4g%s, the least whose planned rounds spend at "
                "most privacy.%s=%g at delta %g",
                self.event.noise_multiplier,
                local,
                TARGET,
                self.target,
                float(privacy["delta"]),
            )
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
        """The wrapped strategy's training messages; their number is the round's sample.

        Raises
        ------
        StopTraining
            When one more release would spend more than ``target_epsilon``.
        """
        self.check_budget(server_round)
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
            self.slope += budget.slope(self.event.noise_multiplier)
            if self.name not in FIXED:
                self.ledger.compose(self.event)
        return arrays, metrics

    def check_budget(self, server_round: int) -> None:
        """Raise :class:`StopTraining` if round ``server_round`` would overspend the target."""
        if self.target is None or not self.ledger.would_exceed(self.event, self.target):
            return
        spent = float(self.ledger.get_privacy_spent().epsilon)
        message = (
            f"privacy budget: round {server_round} would spend more than privacy.{TARGET}="
            f"{self.target:g} (spent {spent:.4g} at delta {self.privacy['delta']:g} in "
            f"{self.releases} releases); training stops before it"
        )
        log.info(message)
        raise StopTraining(message)

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
        """``epsilon`` so far, the releases behind it, their RDP slope, an adaptive norm."""
        fields = {
            "epsilon": float(self.ledger.get_privacy_spent().epsilon),
            "dp_releases": self.releases,
            SLOPE: self.slope,
        }
        if self.name in ADAPTIVE:
            fields["clipping_norm"] = float(self._adaptive().clipping_norm)
        return fields

    def restore(self, row: Mapping[str, Any]) -> None:
        """Continue a resumed run's budget: replay its releases, take back its clipping norm.

        The releases are replayed with the noise they had (the row's summed
        RDP slope), which a resumed run planning more rounds under
        ``target_epsilon`` no longer has; a row from before the slope was
        recorded had this run's noise throughout.
        """
        self.releases = int(row.get("dp_releases", 0))
        if self.releases:
            recorded = float(row.get(SLOPE, math.nan))
            self.slope = (
                recorded
                if math.isfinite(recorded) and recorded > 0
                else self.releases * budget.slope(self.event.noise_multiplier)
            )
            self.ledger.compose(
                budget.gaussian((2 * self.slope) ** -0.5, self.population, self.sampled)
            )
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
        TARGET: privacy.get(TARGET),
        # In units of the sensitivity, local DP's too (its epsilon above is the run's).
        "noise_multiplier": noise_multiplier(privacy),
        "planned_epsilon": budget.planned(privacy, int(settings["simulation.num_rounds"])),
        "epsilon": float(last["epsilon"]) if "epsilon" in last else None,
        "releases": int(last["dp_releases"]) if "dp_releases" in last else None,
        "accounting": "RDP, site-level add-or-remove, no amplification by sampling",
    }


def label(privacy: Mapping) -> str | None:
    """What the comparison shows beside the federated model: ``ε = 3.2, δ = 1e-5``.

    The planned epsilon (``simulation.num_rounds`` releases) follows where it
    differs from the spent one at the digits shown, and the target where set:
    ``ε = 2.1 of 4 planned (target 4), δ = 1e-5``.
    """
    if privacy.get("name", "none") == "none" or privacy.get("epsilon") is None:
        return None
    spent, planned = f"{float(privacy['epsilon']):.3g}", privacy.get("planned_epsilon")
    plan = "" if planned is None or f"{planned:.3g}" == spent else f" of {planned:.3g} planned"
    target = "" if privacy.get(TARGET) is None else f" (target {float(privacy[TARGET]):g})"
    return f"ε = {spent}{plan}{target}, δ = {float(privacy['delta']):g}"


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
