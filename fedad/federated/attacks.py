"""Malicious sites (conf/attack): which sites they are, and how they poison their training reply."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedad.config import Settings, checks, section
from fedad.config.resolvers import malicious_count
from fedad.federated.families.base import Family
from fedad.federated.task import Site
from fedad.models.catalog import family as model_family

# Data poisoning changes the labels a malicious site trains on; model poisoning changes the
# arrays it sends back.
DATA_ATTACKS = ("label_flip", "targeted_flip")
MODEL_ATTACKS = ("sign_flip", "scaled", "gaussian")
ATTACKS = ("none", *DATA_ATTACKS, *MODEL_ATTACKS)
# Every attack takes name, fraction and start_round; these are each attack's own.
PARAMETERS: dict[str, tuple[str, ...]] = {
    "targeted_flip": ("target_class",),
    "sign_flip": ("k",),
    "scaled": ("k",),
    "gaussian": ("sigma",),
}
COMMON = ("name", "fraction", "start_round")
# Mixed into the seed, so the draw of malicious sites is apart from the seed's other draws.
STREAM = 0xA77AC


def check_config(attack_cfg: Mapping, model: str, task: str, sim: Mapping) -> list[str | None]:
    """What is wrong with an ``attack`` config; no phrase when the run can carry it out.

    Parameters
    ----------
    attack_cfg : Mapping
        ``name``, ``fraction``, ``start_round`` and the attack's own parameters.
    model : str
        The federated model's name: trees refuse model poisoning.
    task : str
        ``binary`` or ``multiclass``: only multiclass can target one attack class.
    sim : Mapping
        The ``simulation`` settings (``num_clients``, ``num_rounds``).

    Returns
    -------
    list[str or None]
        One phrase per problem, naming the key; a check that passed may leave a None.
    """
    name = attack_cfg.get("name")
    if name not in ATTACKS:
        return [f"attack must be one of {', '.join(ATTACKS)}, got {name!r}"]
    if name == "none":
        return []
    own = PARAMETERS.get(name, ())
    problems: list[str | None] = [
        f"attack.{key} is not a parameter of {name} (it takes: {', '.join((*COMMON[1:], *own))})"
        for key in attack_cfg
        if key not in (*COMMON, *own)
    ]
    problems += [
        checks.number(attack_cfg, "fraction", "attack", low=0, high=1, high_open=True),
        checks.number(attack_cfg, "start_round", "attack", whole=True, low=1),
        checks.number(attack_cfg, "k", "attack", low=0, low_open=True),
        checks.number(attack_cfg, "sigma", "attack", low=0, low_open=True),
    ]
    if any(problems):
        return [p for p in problems if p]
    rounds, sites = int(sim["num_rounds"]), int(sim["num_clients"])
    fraction = attack_cfg["fraction"]
    if attack_cfg["start_round"] > rounds:
        problems.append(
            f"attack.start_round={attack_cfg['start_round']} is past the last round "
            f"(simulation.num_rounds={rounds}), so no site would ever attack"
        )
    if fraction > 0 and malicious_count(fraction, sites) == 0:
        problems.append(
            f"attack.fraction={fraction:g} of the {sites} sites makes "
            f"floor({fraction * sites:g}) = 0 sites malicious; raise it to at least "
            f"{1 / sites:g}, or set attack.fraction=0 for a clean run"
        )
    target = attack_cfg.get("target_class")
    if target is not None and task == "binary":
        problems.append(
            f"attack.target_class={target!r} needs task=multiclass: in binary mode a site's "
            "rows carry normal/attack only, not the attack type that targeting one class needs; "
            "leave target_class null to relabel every attack row"
        )
    if name in MODEL_ATTACKS and model_family(model) == "booster":
        problems.append(
            f"attack={name} poisons model weights, but model={model} sends boosted trees, which "
            "have no update to reverse, scale or replace by noise; use a data-poisoning attack "
            f"({', '.join(DATA_ATTACKS)}) or a Keras model"
        )
    return problems


def settings_of(settings: Settings) -> dict[str, Any]:
    """The run's attack settings (``attack.*``); ``{"name": "none"}`` when none are set."""
    return {"name": "none", **section(settings, "attack")}


def malicious_sites(seed: int, num_sites: int, fraction: float) -> list[int]:
    """The partition ids of the malicious sites: ``floor(fraction * num_sites)`` drawn by the seed.

    The same at every site and at the server, from the seed and the number of
    partitions alone, and fixed for the whole run.
    """
    count = malicious_count(fraction, num_sites)
    draw = np.random.default_rng([int(seed), STREAM]).permutation(num_sites)[:count]
    return sorted(int(p) for p in draw)


def active(settings: Settings, partition_id: int, num_sites: int, server_round: int) -> str:
    """The attack site ``partition_id`` carries out in ``server_round``: its name, or ``none``."""
    attack = settings_of(settings)
    if attack["name"] == "none" or server_round < int(attack.get("start_round", 1)):
        return "none"
    chosen = malicious_sites(int(settings["seed"]), num_sites, float(attack.get("fraction", 0.0)))
    return str(attack["name"]) if partition_id in chosen else "none"


def targets(settings: Settings, class_names: Sequence[str]) -> list[int] | None:
    """The classes a targeted attack relabels as normal (codes); None for other attacks.

    Binary task: the attack class. Multiclass: ``attack.target_class``, or every
    attack class when it is not set.
    """
    attack = settings_of(settings)
    if attack["name"] != "targeted_flip":
        return None
    target = attack.get("target_class")
    if target is None or len(class_names) == 2:
        return list(range(1, len(class_names)))
    return [list(class_names).index(str(target))]


def train_site(
    family: Family,
    arrays: list[np.ndarray],
    site: Site,
    config: Mapping,
    settings: Settings,
    partition_id: int,
    num_sites: int,
    seed: int,
) -> tuple[list[np.ndarray], dict[str, float]]:
    """What the site's train handler replies: ``family.fit``, poisoned at a malicious site.

    An honest site (and a malicious one before ``attack.start_round``) returns
    ``family.fit`` as it is. A malicious site trains on poisoned labels (data
    poisoning) or sends poisoned arrays (model poisoning); its reply keeps its
    honest ``num-examples``.

    Parameters
    ----------
    family : Family
        The run's model family.
    arrays : list[np.ndarray]
        The global model received.
    site : Site
        The site's data.
    config : Mapping
        The train message's config (``server-round``, ...).
    settings : Mapping
        Flat run settings (``seed``, ``attack.*``).
    partition_id, num_sites : int
        This site and how many there are.
    seed : int
        The seed of this site's update in this round.

    Returns
    -------
    tuple
        The reply's arrays and metrics.
    """
    name = active(settings, partition_id, num_sites, int(config["server-round"]))
    rng = np.random.default_rng([seed, STREAM])
    attack = settings_of(settings)
    if name in DATA_ATTACKS:
        hits = targets(settings, family.class_names)
        site = dataclasses.replace(
            site,
            y_train=poison_labels(site.y_train, len(family.class_names), hits, rng),
            y_val=poison_labels(site.y_val, len(family.class_names), hits, rng),
        )
    local, metrics = family.fit(arrays, site, config, seed=seed)
    if name in MODEL_ATTACKS:
        local = poison_update(
            name,
            arrays,
            local,
            float(attack.get("k", 1.0)),
            float(attack.get("sigma", 1.0)),
            rng,
        )
    return local, metrics


def poison_labels(
    y: np.ndarray, n_classes: int, hits: Sequence[int] | None, rng: np.random.Generator
) -> np.ndarray:
    """Labels a malicious site trains on.

    With ``hits`` (targeted): rows of those classes become normal (0). Without:
    every row gets a random other class, which for two classes is the flip.
    """
    y = np.asarray(y)
    if hits is not None:
        return np.where(np.isin(y, hits), 0, y).astype(y.dtype)
    shift = rng.integers(1, n_classes, size=len(y))
    return ((y + shift) % n_classes).astype(y.dtype)


def poison_update(
    name: str,
    global_arrays: list[np.ndarray],
    local: list[np.ndarray],
    k: float,
    sigma: float,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """The arrays a model-poisoning site sends instead of ``local``.

    ``sign_flip``: ``w_global - k * delta``; ``scaled``: ``w_global + k * delta``;
    ``gaussian``: ``w_global + N(0, sigma^2)``, where ``delta = local - w_global``.
    """
    out = []
    for w, v in zip(global_arrays, local, strict=True):
        base = np.asarray(w, dtype=np.float64)
        delta = np.asarray(v, dtype=np.float64) - base
        if name == "sign_flip":
            sent = base - k * delta
        elif name == "scaled":
            sent = base + k * delta
        else:
            sent = base + rng.normal(0.0, sigma, size=base.shape)
        out.append(sent.astype(np.asarray(v).dtype))
    return out


def describe(settings: Settings, num_sites: int) -> dict[str, Any]:
    """The run's attack for ``results.json``: its settings and the malicious sites."""
    attack = settings_of(settings)
    if attack["name"] == "none":
        return {"name": "none", "malicious_sites": []}
    sites = malicious_sites(int(settings["seed"]), num_sites, float(attack.get("fraction", 0)))
    return {**attack, "malicious_sites": sites, "share": len(sites) / num_sites}
