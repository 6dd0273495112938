"""Going alone: each site trains the federated model's family on its own shard, same budget."""

from __future__ import annotations

import logging
import time

import numpy as np

from fedad.comparison import ModelResult
from fedad.config import Settings
from fedad.data.prepared import PreparedData
from fedad.federated import scaling, shards
from fedad.federated.families import family_for
from fedad.federated.task import load_site, site_scaling
from fedad.metrics import compute_metrics

log = logging.getLogger(__name__)
# How the driver names itself in the shards' access log when it trains a site alone.
LOCAL_READER = "local_only"


def train_alone(
    settings: Settings, data: PreparedData, n_sites: int, limit: int
) -> list[ModelResult]:
    """Train the run's model at up to ``limit`` sites, each alone; score each on the test set.

    Each site starts from the same initial model as the federated run, trains
    for as many rounds of ``train.local_epochs`` as the federated run has (one
    site, no server), scales with its own statistics (it has no others), and
    is scored on the global test set. The autoencoder's threshold comes from
    the site's own validation rows.

    Parameters
    ----------
    settings : Mapping
        The federated run's settings (its shards are in ``run-dir``).
    data : PreparedData
        For the global test set.
    n_sites : int
        Sites of the run.
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
    chosen = np.sort(np.random.default_rng(seed).permutation(n_sites)[: min(limit, n_sites)])
    rounds = int(settings["simulation.num_rounds"])
    started = time.perf_counter()
    results = []
    for pid in chosen:
        # In the driver process, whose TensorFlow is already set up: no init_runtime here.
        family = family_for(alone)
        family.seed_initial(seed)
        arrays = family.initial_arrays()
        site = load_site(alone, int(pid), {}, family.val_fraction(), reader=LOCAL_READER)
        for server_round in range(1, rounds + 1):
            arrays, _ = family.fit(arrays, site, {}, seed=seed + 1000 * server_round + int(pid))
        family.after_evaluate(family.site_metrics(arrays, site, family.evaluate_config()))
        X_site, _ = shards.read_shard(
            shards.shard_path(settings["run-dir"], int(pid)), LOCAL_READER
        )
        mean, std = site_scaling(X_site, {})
        scores = family.scores(arrays, scaling.standardize(data.X_test, mean, std))
        threshold = family.evaluate_config().get("threshold")
        y_true, y_pred = data.y_test, None
        if scores.ndim == 1:
            y_true = (data.y_test != 0).astype(np.int64)
            y_pred = (scores >= (threshold if threshold is not None else np.inf)).astype(int)
        metrics = compute_metrics(y_true, scores, data.class_names, y_pred=y_pred)
        results.append((int(pid), metrics, scores))
    seconds = (time.perf_counter() - started) / max(len(results), 1)
    return _summaries(str(settings["model.name"]), results, seconds)


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
        ModelResult(f"local_{model}", "local", mean, None, seconds, None, info),
        ModelResult(f"local_{model}_worst", "local", metrics, scores, seconds, None, info),
    ]
