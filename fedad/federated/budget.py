"""The DP budget: Flower's RDP accountant for a run, and the noise a target epsilon calls for."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

# privacy.target_epsilon: the epsilon (at privacy.delta) the planned rounds may spend; fedad
# then picks the noise (noise_multiplier, or local DP's per-round epsilon) instead of the user.
TARGET = "target_epsilon"
# The key each option sets its noise with: local DP's per-round epsilon, the others' multiplier.
KNOB = {"local": "epsilon"}
# The noise without a target (conf/privacy/*.yaml leave the knob null, for a target to fill).
UNTARGETED = {
    "central": 1.0,
    "client": 1.0,
    "central_adaptive": 0.5,
    "client_adaptive": 0.5,
    "local": 1.0,
}
# The noise multipliers a target is met among: above the highest, a model learns nothing.
LOWEST, HIGHEST = 1e-3, 1e3
# Calibrated a hair below the target, so that float rounding (a replayed ledger, local DP's
# epsilon and back) can never push the rounds the plan counts on over it.
MARGIN = 1e-9
# The history column that fixes the releases' RDP curve (see :func:`slope`).
SLOPE = "dp_rdp_slope"


def knob(name: str) -> str:
    """The key option ``name`` sets its noise with (``epsilon`` for local DP)."""
    return KNOB.get(name, "noise_multiplier")


def local_scale(delta: float) -> float:
    """``sqrt(2 ln(1.25 / delta))``: LocalDpMod's noise is this x sensitivity / epsilon."""
    return math.sqrt(2 * math.log(1.25 / float(delta)))


def noise_multiplier(privacy: Mapping) -> float:
    """The Gaussian noise of one round, in units of the sensitivity it protects.

    Central DP: ``noise_multiplier``. Local DP: what LocalDpMod's calibration
    ``sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon`` makes it.
    """
    if privacy["name"] == "local":
        return local_scale(privacy["delta"]) / float(privacy["epsilon"])
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


def gaussian(noise: float, population: int, sample: int) -> Any:
    """One round's release of noise ``noise``, as Flower's accountant composes it."""
    from flwr.serverapp import GaussianPrivacyEvent

    return GaussianPrivacyEvent(noise, sample, population)


def event(privacy: Mapping, population: int, sample: int) -> Any:
    """One round's release under ``privacy``."""
    return gaussian(noise_multiplier(privacy), population, sample)


def epsilon(privacy: Mapping, releases: int, population: int, sample: int) -> float:
    """The run's epsilon at ``privacy.delta`` after ``releases`` private rounds."""
    ledger = accountant(privacy, population)
    if releases:
        ledger.compose(event(privacy, population, sample), count=releases)
    return float(ledger.get_privacy_spent().epsilon)


def slope(noise: float) -> float:
    """One release's RDP slope ``1 / (2 noise^2)``: its Renyi epsilon at order a is a x that.

    Without amplification a Gaussian release's RDP is linear in the order, so
    releases of different noise compose to one release of noise
    ``1 / sqrt(2 x their summed slope)``: a history row's :data:`SLOPE` is
    all a resumed run needs to replay them, whatever noise each had.
    """
    return 1 / (2 * noise**2)


@functools.lru_cache(maxsize=32)
def calibrate(target: float, delta: float, rounds: int) -> float | None:
    """The least noise multiplier (within 1e-6) whose ``rounds`` releases spend <= ``target``.

    Found by dp-accounting's ``calibrate_dp_mechanism`` on the RDP accountant
    Flower's wraps (same orders, same relation), then checked with Flower's
    own, as a run composes (one release at a time).

    Returns
    -------
    float or None
        None when even :data:`HIGHEST` spends more than ``target``.
    """
    # dp-accounting ships no type hints.
    from dp_accounting import dp_event, mechanism_calibration  # type: ignore[import-untyped]
    from dp_accounting.privacy_accountant import (  # type: ignore[import-untyped]
        NeighboringRelation,
    )
    from dp_accounting.rdp import RdpAccountant  # type: ignore[import-untyped]

    aim = target * (1 - MARGIN)

    def planned(noise: float) -> dp_event.DpEvent:
        return dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(noise), rounds)

    def fresh() -> RdpAccountant:
        return RdpAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)

    if fresh().compose(planned(HIGHEST)).get_epsilon(delta) > aim:
        return None
    if fresh().compose(planned(LOWEST)).get_epsilon(delta) <= aim:
        return LOWEST
    noise = float(
        mechanism_calibration.calibrate_dp_mechanism(
            fresh,
            planned,
            aim,
            delta,
            mechanism_calibration.ExplicitBracketInterval(LOWEST, HIGHEST),
            tol=1e-6,
        )
    )
    ledger = accountant({"delta": delta}, 1)
    for _ in range(rounds):
        ledger.compose(gaussian(noise, 1, 1))
    if ledger.get_privacy_spent().epsilon > target:  # never seen: the margin covers rounding
        raise RuntimeError(f"calibrated noise {noise} spends more than epsilon {target}")
    return noise


def resolve(privacy: Mapping, rounds: int) -> dict[str, Any]:
    """``privacy`` with its noise set: from ``target_epsilon`` over ``rounds``, or the default.

    With a target, local DP's per-round ``epsilon`` is the one LocalDpMod's
    calibration turns into the calibrated multiplier. Unchanged where the
    knob is set, or where no multiplier up to :data:`HIGHEST` meets the
    target (``check_config`` refuses such a run).
    """
    resolved = dict(privacy)
    name = str(privacy.get("name", "none"))
    key = knob(name)
    if name == "none" or resolved.get(key) is not None:
        return resolved
    if privacy.get(TARGET) is None:
        resolved[key] = UNTARGETED[name]
        return resolved
    noise = calibrate(float(privacy[TARGET]), float(privacy["delta"]), int(rounds))
    if noise is not None:
        resolved[key] = local_scale(privacy["delta"]) / noise if name == "local" else noise
    return resolved


def planned(privacy: Mapping, rounds: int) -> float:
    """The epsilon ``rounds`` releases of a resolved ``privacy`` spend (the plan)."""
    return epsilon(privacy, rounds, 1, 1)
