"""How many sites one histogram session can hold at once on this machine: actors and memory."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from fedad.config.resolvers import sampled_sites

STRATEGY = "fedxgb_histogram"
# Every site of a session waits in XGBoost until all reach each allreduce, so the cohort needs
# that many Ray actors alive at once. They mostly wait on each other: the engine lets up to
# this many share a CPU (Ray's logical CPUs raised to fit), beyond which a round crawls.
SITES_PER_CPU = 8
# Resident memory of one site while it boosts, rows aside: its Ray actor, 0.35 GB without
# TensorFlow (lean_actor; measured in a 3-site run's actors; a process importing what an actor
# imports holds 0.31 GB, 0.80 GB with TensorFlow), and its sessions' XGBoost worker, 0.08 GB
# before its rows and its DMatrix: 0.5 GB leaves them some room.
SITE_BYTES = 0.5e9
# What a histogram run's Ray actors must not import: Flower's actor module imports TensorFlow
# whenever it is installed, and an XGBoost site never uses it.
BLOCKED = ("tensorflow",)
# Ray's worker_process_setup_hook for those actors (a dotted path a worker imports).
LEAN_ACTOR_HOOK = f"{__name__}.lean_actor"


def lean_actor() -> None:
    """Keep :data:`BLOCKED` out of this process: its import then fails, as if not installed."""
    for name in BLOCKED:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


def actors_needed(sim: Mapping, strategy: str) -> int:
    """Actors that must be alive at once: the cohort of a histogram run, else 0 (no need)."""
    return sampled_sites(sim) if strategy == STRATEGY else 0


def available_memory() -> float | None:
    """Bytes of memory available now (``/proc/meminfo``), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check(sim: Mapping, strategy: str) -> str | None:
    """What stops a histogram cohort from being in one session at once here; None when it fits.

    Parameters
    ----------
    sim : Mapping
        The ``simulation`` settings.
    strategy : str
        ``strategy.name``: only ``fedxgb_histogram`` needs its cohort at once.

    Returns
    -------
    str or None
        One phrase naming the limit and the fix.
    """
    cohort = actors_needed(sim, strategy)
    if not cohort or sim.get("address"):
        # A Ray cluster's size is its own: not this machine's to judge.
        return None
    cpus = os.cpu_count() or 1
    per_actor = float((sim.get("client_resources") or {}).get("num_cpus", 1))
    fixed = (sim.get("ray_init_args") or {}).get("num_cpus")
    actors = math.floor(float(fixed) / per_actor) if fixed is not None else cohort
    limit = SITES_PER_CPU * cpus
    if cohort > limit or actors < cohort:
        return (
            f"strategy={STRATEGY} needs every sampled site in one XGBoost session at once, so "
            f"its {cohort} sites (simulation.num_clients x simulation.fraction_train, at least "
            f"simulation.min_clients) need {cohort} Ray actors alive together, but this machine "
            + (
                f"allows {actors} (simulation.ray_init_args.num_cpus={fixed} / "
                f"simulation.client_resources.num_cpus={per_actor:g})"
                if actors < cohort
                else f"has {cpus} CPUs, and fedad lets at most {SITES_PER_CPU} sites share one"
            )
            + f"; sample at most {min(actors, limit)} sites a round (a lower "
            "simulation.fraction_train or simulation.num_clients), or attach to a larger Ray "
            "cluster with simulation.address=..."
        )
    memory = available_memory()
    if memory is not None and cohort * SITE_BYTES > memory:
        fits = int(memory // SITE_BYTES)
        return (
            f"strategy={STRATEGY} keeps all {cohort} sampled sites in memory at once (about "
            f"{SITE_BYTES / 1e9:.1f} GB each: a Ray actor and its XGBoost process), more than "
            f"the {memory / 1e9:.1f} GB available here; sample at most {fits} sites a round "
            "(a lower simulation.fraction_train or simulation.num_clients), or free memory"
        )
    return None


def ray_cpus(cohort: int, per_actor: float) -> int:
    """Ray's logical CPUs for ``cohort`` actors of ``per_actor`` CPUs: at least this machine's."""
    return max(os.cpu_count() or 1, math.ceil(cohort * per_actor))
