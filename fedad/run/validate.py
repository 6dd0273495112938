"""Every setting of a run checked before any data is read or Ray starts."""

from __future__ import annotations

import math
import os

from omegaconf import DictConfig

from fedad.baselines.runner import check_config as check_baselines
from fedad.config import checks, to_dict
from fedad.config.resolvers import sampled_sites
from fedad.data.federation import check_config as check_federation
from fedad.data.partition import check_config as check_partition
from fedad.data.prepare import TASKS
from fedad.data.scaling import SCALINGS
from fedad.data.sources import check_config as check_dataset
from fedad.detector.build import check_config as check_detector
from fedad.errors import JobSkipped
from fedad.evaluation.decision import check_config as check_decision
from fedad.federated.attacks import check_config as check_attack
from fedad.federated.faults import FAILURE_MODES
from fedad.federated.fednova import check_config as check_fednova
from fedad.federated.histogram import cohort, server
from fedad.federated.personalize import check_config as check_personalize
from fedad.federated.privacy import check_config as check_privacy
from fedad.federated.scaffold import check_config as check_scaffold
from fedad.federated.secagg import check_config as check_secagg
from fedad.federated.stopping import METRICS as STOP_METRICS
from fedad.federated.strategies import byzantine_bound
from fedad.federated.strategies import check_config as check_strategy
from fedad.models import OPTIMIZERS
from fedad.models import check_config as check_model
from fedad.run.tracking import check_config as check_tracking


def validate(cfg: DictConfig) -> None:
    """Raise one :class:`~fedad.errors.FedadError` listing every setting of ``cfg`` that cannot run.

    The schema (:mod:`fedad.config`) has already checked types at compose
    time; this checks ranges, each option's own parameters (dataset,
    partition, model, strategy, attack, privacy, baselines, tracking) and the relations
    between values (``min_clients`` against the sites, local CPUs against the
    resources each site asks for, an attack or DP against the model and strategy).

    Parameters
    ----------
    cfg : DictConfig
        The composed config.

    Raises
    ------
    JobSkipped
        When every setting is valid but a robust strategy assumes more attackers
        than its bound allows with the replies a round can expect (by default it
        assumes the true number of malicious sites): a sweep skips such a job.
    """
    values = to_dict(cfg)
    sim, train, pre = values["simulation"], values["train"], values["preprocess"]
    stop = sim["stop"] if isinstance(sim.get("stop"), dict) else {}
    problems = [
        checks.number(values, "seed", "", whole=True, low=0, high=2**32 - 1),
        checks.choice(values, "task", "", TASKS),
        checks.number(pre, "test_size", "preprocess", low=0, high=1, low_open=True, high_open=True),
        checks.number(pre, "audit_threshold", "preprocess", low=0.5, high=1),
        checks.number(sim, "num_clients", "simulation", whole=True, low=1),
        checks.number(sim, "num_rounds", "simulation", whole=True, low=1),
        checks.number(sim, "fraction_train", "simulation", low=0, high=1, low_open=True),
        checks.number(sim, "fraction_evaluate", "simulation", low=0, high=1, low_open=True),
        checks.number(sim, "min_clients", "simulation", whole=True, low=1),
        checks.number(sim, "client_failure_rate", "simulation", low=0, high=1, high_open=True),
        checks.choice(sim, "failure_mode", "simulation", FAILURE_MODES),
        checks.number(sim, "round_timeout", "simulation", low=0, low_open=True),
        checks.number(sim, "checkpoint_every", "simulation", whole=True, low=0),
        checks.choice(sim, "scaling", "simulation", SCALINGS),
        checks.number(sim, "local_sites", "simulation", whole=True, low=0),
        checks.flag(sim, "central_sites", "simulation"),
        None
        if sim.get("final_eval_fraction") is None
        else checks.number(sim, "final_eval_fraction", "simulation", low=0, high=1, low_open=True),
        *_stop(stop),
        checks.number(train, "local_epochs", "train", whole=True, low=1),
        checks.number(train, "batch_size", "train", whole=True, low=1),
        checks.number(train, "learning_rate", "train", low=0, low_open=True),
        checks.choice(train, "optimizer", "train", OPTIMIZERS),
        checks.number(train, "early_stopping_patience", "train", whole=True, low=0),
        checks.number(train, "val_fraction", "train", low=0, high=1, high_open=True),
        checks.number(train, "test_fraction", "train", low=0, high=1, high_open=True),
        _resources(sim),
    ]
    if not any(problems) and sim["min_clients"] > sim["num_clients"]:
        problems.append(
            f"simulation.min_clients ({sim['min_clients']}) cannot exceed the "
            f"simulation.num_clients={sim['num_clients']} sites"
        )
    if not any(problems) and stop.get("patience", 0) > 0 and not train["val_fraction"] > 0:
        problems.append(
            "simulation.stop watches the sites' pooled validation slices: with "
            f"simulation.stop.patience={stop['patience']} train.val_fraction must be > 0 "
            "(or set simulation.stop.patience=0 to train simulation.num_rounds)"
        )
    if not any(problems) and train["val_fraction"] + train["test_fraction"] >= 1:
        problems.append(
            "train.val_fraction + train.test_fraction must leave rows to train on (sum < 1), "
            f"got {train['val_fraction']} + {train['test_fraction']}"
        )
    problems += check_dataset(values["dataset"])
    problems += check_partition(values["partition"])
    problems += check_federation(values["dataset"], values["partition"])
    problems += check_baselines(values["baselines"])
    problems += check_tracking(values["tracking"])
    problems += check_detector(values["detector"])
    problems += check_decision(values["decision"])
    bound = None
    if values["federated"]:
        problems += check_model(values["model"], values["task"])
        model = values["model"].get("name")
        strategy = values["strategy"]
        bound = byzantine_bound(strategy.get("name"), strategy, expected_replies(sim))
        problems += [
            p for p in check_strategy(strategy, expected_replies(sim), model) if p != bound
        ]
        problems += check_attack(values.get("attack", {}), model, values["task"], sim)
        problems += check_privacy(values.get("privacy", {}), strategy.get("name"), model, sim)
        problems += check_scaffold(
            strategy.get("name"),
            values.get("privacy", {}).get("name", "none"),
            str(train.get("optimizer")),
        )
        problems += check_fednova(
            strategy.get("name"),
            str(train.get("optimizer")),
            values.get("personalize", {}).get("name", "none"),
            bool(values["model"].get("batch_norm", False)),
        )
        problems += check_secagg(
            values.get("secure_aggregation", {}),
            strategy.get("name"),
            model,
            values.get("privacy", {}).get("name", "none"),
            sim,
            values.get("personalize", {}).get("name", "none"),
        )
        problems += check_personalize(
            values.get("personalize", {}),
            model,
            strategy.get("name"),
            values.get("privacy", {}).get("name", "none"),
        )
        problems.append(cohort.check(sim, strategy.get("name")))
        problems.append(server.check_port(strategy))
        if values["strategy"].get("name") == "fedxgb_cyclic" and (
            sim["fraction_train"] != 1.0 or sim["fraction_evaluate"] != 1.0
        ):
            problems.append(
                "strategy=fedxgb_cyclic visits the sites one a round, in turn: it needs "
                "simulation.fraction_train=1.0 and simulation.fraction_evaluate=1.0"
            )
        if model == "autoencoder" and not train["val_fraction"] > 0:
            problems.append(
                "model=autoencoder chooses its threshold on each site's validation rows: "
                "train.val_fraction must be > 0"
            )
    checks.raise_problems(problems, "Cannot start the run")
    if bound:
        raise JobSkipped(f"Cannot start the run: {bound}.")


def _stop(stop: dict) -> list[str | None]:
    """``simulation.stop``: a whole patience >= 0, a known metric, a min_delta >= 0."""
    where = "simulation.stop"
    return [
        checks.number(
            stop, "patience", where, whole=True, low=0, hint="rounds without improvement; 0 = off"
        ),
        checks.choice(stop, "metric", where, STOP_METRICS),
        checks.number(
            stop, "min_delta", where, low=0, hint="the change an improvement must exceed"
        ),
    ]


def expected_replies(sim: dict) -> int:
    """Training replies a round can expect: the sites sampled, less those made to fail."""
    failing = math.floor(float(sim["client_failure_rate"]) * int(sim["num_clients"]))
    return max(sampled_sites(sim) - failing, 0)


def _resources(sim: dict) -> str | None:
    """Each site's resources as numbers, within this machine's CPUs for a local Ray."""
    resources = sim.get("client_resources") or {}
    for key in resources:
        problem = checks.number(resources, key, "simulation.client_resources", low=0)
        if problem:
            return problem
    cpus = float(resources.get("num_cpus", 1))
    if cpus <= 0:
        return "simulation.client_resources.num_cpus must be > 0, got 0"
    available = os.cpu_count() or 1
    if sim.get("address") is None and cpus > available:
        return (
            f"simulation.client_resources.num_cpus={cpus:g} is more than the {available} CPUs of "
            "this machine, so no site could ever be scheduled; ask for at most "
            f"{available} (or attach to a larger Ray cluster with simulation.address=...)"
        )
    return None
