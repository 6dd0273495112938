"""Going alone: each site trains the federated model's family on its own shard, same budget."""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from flwr.app import ConfigRecord

from fedad.config import Settings
from fedad.data import scaling
from fedad.data.prepared import PreparedData
from fedad.errors import FedadError
from fedad.evaluation import fairness
from fedad.evaluation.comparison import ModelResult
from fedad.evaluation.decision import decide, threshold_from_scores
from fedad.evaluation.metrics import compute_metrics
from fedad.federated import shards
from fedad.federated.families.base import Family
from fedad.federated.families.registry import family_for
from fedad.federated.task import Site, load_site, run_decision, site_scaling
from fedad.models.catalog import local_name

log = logging.getLogger(__name__)
# How the driver names itself in the shards' access log when it trains a site alone.
LOCAL_READER = "local_only"
# Rows trained (sites' rows x rounds x local epochs) from which the sites train in parallel
# processes, one per CPU: about a minute of a 2-core machine's training, against the processes'
# start-up of ~10 s.
PARALLEL_ROW_PASSES = 2_000_000


def train_alone(
    settings: Settings, data: PreparedData, site_rows: Sequence[int], limit: int
) -> list[ModelResult]:
    """Train the run's model at up to ``limit`` sites, each alone; score each on the test set.

    Each site starts from the same initial model as the federated run, trains
    for as many rounds of ``train.local_epochs`` as the federated run has (one
    site, no server), scales with its own statistics (it has no others), and
    is scored on the global test set. The autoencoder's threshold comes from
    the site's own validation rows. Each site alone is also scored on its own
    test slice, as the global model is at the site (``alone_`` columns of
    ``clients.csv``, then the fairness audit of the sites:
    :func:`fedad.evaluation.fairness.audit_run`, in each row's ``info["fairness"]``).
    When the sites' training is worth it
    (:data:`PARALLEL_ROW_PASSES`), they train in spawned processes, one per
    CPU, each with the framework on one thread as an actor has it.

    Parameters
    ----------
    settings : Mapping
        The federated run's settings (its shards are in ``run-dir``).
    data : PreparedData
        For the global test set.
    site_rows : Sequence[int]
        Training rows of each site of the run.
    limit : int
        At most this many sites, drawn with the seed when there are more.

    Returns
    -------
    list[ModelResult]
        ``local_<model>``: the sites' mean (its confusion matrix pools them),
        and ``local_<model>_worst``: the site with the lowest macro-F1.
    """
    alone = {**settings, "strategy.name": "local"}
    seed = int(settings["seed"])
    n_sites = len(site_rows)
    chosen = np.random.default_rng(seed).permutation(n_sites)[: min(limit, n_sites)]
    sites = sorted(int(pid) for pid in chosen)
    test = (data.X_test, data.y_test, list(data.class_names))
    workers = _workers(alone, sites, sum(site_rows[pid] for pid in sites))
    if workers > 1:
        log.info("each site alone: %d sites over %d processes", len(sites), workers)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            workers, context, initializer=_set_up_worker, initargs=(alone, test)
        ) as pool:
            results = list(pool.map(_site_alone_in_worker, sites))
    else:
        # In the driver process, whose TensorFlow is already set up: no init_runtime here.
        results = [site_alone(alone, pid, *test) for pid in sites]
    seconds = float(np.mean([result[3] for result in results]))
    summaries = _summaries(str(settings["model.name"]), [r[:3] for r in results], seconds)
    audit = _audit_sites(str(settings["run-dir"]), {r[0]: r[4] for r in results})
    for summary in summaries:
        summary.info["fairness"] = audit
    rule = run_decision(settings)
    if rule.rule != "argmax" and family_for(settings).calibrated:
        for summary in summaries:
            summary.info["decision"] = {
                "rule": rule.rule,
                "target_fpr": rule.target_fpr,
                "chosen_on": "each site's own validation rows (argmax where they hold one class)",
            }
    return summaries


def site_alone(
    settings: Settings,
    pid: int,
    X_test: np.ndarray,
    y_test: np.ndarray,
    class_names: list[str],
) -> tuple[int, dict, np.ndarray, float, dict]:
    """Train site ``pid`` alone for the run's rounds; its metrics and scores on the test set.

    Parameters
    ----------
    settings : Mapping
        The run's settings with ``strategy.name`` ``local``.
    pid : int
        The site's partition id.
    X_test, y_test : np.ndarray
        The global test set, unscaled, and its class codes.
    class_names : list[str]
        The task's classes.

    Returns
    -------
    tuple[int, dict, np.ndarray, float, dict]
        ``pid``, the metrics, the scores, the seconds it took, and the
        metrics on the site's own test slice (as the global model's at the
        site: the family's :meth:`~fedad.federated.families.base.Family.metrics`).
    """
    started = time.perf_counter()
    seed = int(settings["seed"])
    family = family_for(settings)
    family.seed_initial(seed)
    arrays = family.initial_arrays()
    site = load_site(settings, pid, ConfigRecord(), family.val_fraction(), reader=LOCAL_READER)
    arrays = train_rounds(family, arrays, site, settings, pid)
    own = family.metrics(arrays, site.X_test, site.y_test, family.evaluate_config())
    X_site, _ = shards.read_shard(shards.shard_path(str(settings["run-dir"]), pid), LOCAL_READER)
    mean, std = site_scaling(X_site, ConfigRecord())
    scores = family.scores(arrays, scaling.standardize(X_test, mean, std))
    threshold = family.evaluate_config().get("threshold")
    y_true, y_pred = y_test, None
    if scores.ndim == 1:
        y_true = (y_test != 0).astype(np.int64)
        y_pred = (scores >= (threshold if threshold is not None else np.inf)).astype(int)
    elif family.calibrated:
        # The run's decision rule, calibrated on this site's own validation rows.
        y_pred = decide(scores, _site_threshold(family, arrays, site))
    metrics = compute_metrics(y_true, scores, class_names, y_pred=y_pred)
    return pid, metrics, scores, time.perf_counter() - started, own


def train_rounds(
    family: Family, arrays: list[np.ndarray], site: Site, settings: Settings, key: int
) -> list[np.ndarray]:
    """Train ``site`` from ``arrays`` for the run's rounds, as one site with no server would.

    Each round is one :meth:`~fedad.federated.families.base.Family.fit` (the
    run's local epochs), reseeded from the run's seed, the round and ``key``
    (the site's id); the family then takes the site's own evaluation (the
    autoencoder's threshold).
    """
    seed = int(settings["seed"])
    for server_round in range(1, int(settings["simulation.num_rounds"]) + 1):
        arrays, _ = family.fit(arrays, site, {}, seed=seed + 1000 * server_round + key)
    family.after_evaluate(family.site_metrics(arrays, site, family.evaluate_config()))
    return arrays


def _audit_sites(run_dir: str, own: dict[int, dict]) -> dict | None:
    """Add each site alone's metrics on its slice to ``clients.csv`` (``alone_``); audit the sites.

    None where the run wrote no ``clients.csv``.
    """
    if not fairness.record(run_dir, "alone", own):
        return None
    return fairness.audit_run(run_dir)


def _site_threshold(family: Family, arrays: list[np.ndarray], site: Site) -> float | None:
    """The run's rule on the site's validation rows; argmax (None) where they cannot tell.

    A site may hold no normal validation row (or only one class): no threshold can be
    chosen there, so that site alone decides by the most probable class.
    """
    rule = family.decision
    try:
        scores = family.scores(arrays, site.X_val)
        return threshold_from_scores(site.y_val, scores, rule.rule, rule.target_fpr)
    except FedadError:
        return None


def _workers(settings: Settings, sites: list[int], rows: int) -> int:
    """Processes to train the sites in: one per CPU when the work pays for their start-up.

    A process imports the model's framework first (TensorFlow: ~7 s and 800 MB), so
    below :data:`PARALLEL_ROW_PASSES` rows trained, the driver trains every site itself.
    """
    passes = rows * int(settings["simulation.num_rounds"]) * int(settings["train.local_epochs"])
    if passes < PARALLEL_ROW_PASSES:
        return 1
    return max(1, min(len(sites), os.cpu_count() or 1))


# One process's settings and test set (:func:`_set_up_worker`), kept for its sites.
_WORKER: dict = {}


def _set_up_worker(settings: Settings, test: tuple) -> None:
    # As the actors' (log_to_driver false): a worker's output is the framework's start-up
    # chatter; its errors reach the driver as exceptions. Done before the framework's import.
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 1)
    os.dup2(quiet, 2)
    os.close(quiet)
    family_for(settings).init_runtime()
    _WORKER.update(settings=settings, test=test)


def _site_alone_in_worker(pid: int) -> tuple[int, dict, np.ndarray, float, dict]:
    return site_alone(_WORKER["settings"], pid, *_WORKER["test"])


def _summaries(model: str, results: list, seconds: float) -> list[ModelResult]:
    """The mean over the sites and the worst site, as two rows of the comparison."""
    macro = [m["macro_f1"] or 0.0 for _, m, _ in results]
    worst = int(np.argmin(macro))
    scalar = [k for k, v in results[0][1].items() if isinstance(v, float | int) or v is None]
    mean = {
        k: float(np.mean([m[k] for _, m, _ in results if m[k] is not None]))
        if any(m[k] is not None for _, m, _ in results)
        else None
        for k in scalar
    }
    mean["confusion"] = np.sum([m["confusion"] for _, m, _ in results], axis=0).tolist()
    mean["per_class_recall"] = results[worst][1]["per_class_recall"]
    info = {
        "sites": [pid for pid, _, _ in results],
        "site_macro_f1": [float(v) for v in macro],
        "worst_site": results[worst][0],
    }
    pid, metrics, scores = results[worst]
    log.info(
        "each site alone (%d sites): macro-F1 mean %.3f, worst %.3f (site %d)",
        len(results),
        np.mean(macro),
        macro[worst],
        pid,
    )
    return [
        ModelResult(local_name(model), "local", mean, None, seconds, None, info),
        ModelResult(local_name(model, worst=True), "local", metrics, scores, seconds, None, info),
    ]
