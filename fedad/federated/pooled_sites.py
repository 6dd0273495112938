"""The central reference at each site: the run's model trained on every site's rows pooled."""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import ConfigRecord

from fedad.config import Settings
from fedad.data import scaling
from fedad.evaluation import fairness
from fedad.federated import shards
from fedad.federated.families.registry import family_for
from fedad.federated.local_only import train_rounds
from fedad.federated.task import Site, load_site

log = logging.getLogger(__name__)
# How the driver names itself in the shards' access log when it pools the sites' rows.
READER = "pooled_sites"


def score_sites(settings: Settings, n_sites: int) -> dict[int, dict]:
    """Train the run's model on the sites' pooled training rows; score it on each site's slice.

    The fairness audit's central reference (``central_`` columns of
    ``clients.csv``): what one model trained where all the rows are would
    score at each site. It sees every site's training and validation rows as
    the sites split them, and none of their test slices, so each site's slice
    stays held out from it as from the federated model. Every site is scaled
    with the statistics pooled over all shards, and the model trains as one
    site alone does (:func:`fedad.federated.local_only.train_rounds`: the
    run's initial model, rounds and local epochs, no server), then it is
    scored with the family's site metrics (the global model's columns).

    Parameters
    ----------
    settings : Mapping
        The federated run's settings (its shards are in ``run-dir``).
    n_sites : int
        The run's sites.

    Returns
    -------
    dict[int, dict]
        Each site's metrics on its own test slice, also written into
        ``clients.csv`` (``central_`` columns) when the run has one.
    """
    alone = {**settings, "strategy.name": "local"}
    family = family_for(alone)
    family.seed_initial(int(settings["seed"]))
    run_dir = str(settings["run-dir"])
    sums = [
        scaling.site_sums(shards.read_shard(shards.shard_path(run_dir, pid), READER)[0])
        for pid in range(n_sites)
    ]
    mean, std = scaling.pooled_moments(sums)
    config = ConfigRecord({"scale-mean": mean.tolist(), "scale-std": std.tolist()})
    sites = [
        load_site(alone, pid, config, family.val_fraction(), reader=READER)
        for pid in range(n_sites)
    ]
    X_train, y_train, X_val, y_val, X_test, y_test = (
        np.concatenate([getattr(site, part) for site in sites])
        for part in ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test")
    )
    pooled = Site(X_train, y_train, X_val, y_val, X_test, y_test)
    log.info("the central reference: %d pooled training rows", len(pooled.y_train))
    arrays = train_rounds(family, family.initial_arrays(), pooled, alone, key=n_sites)
    own = {
        pid: family.metrics(arrays, site.X_test, site.y_test, family.evaluate_config())
        for pid, site in enumerate(sites)
    }
    fairness.record(run_dir, "central", own)
    return own
