"""Flower ClientApp: a site's message handlers for feature sums, training and evaluation."""

from __future__ import annotations

from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedad.data import scaling
from fedad.federated import attacks, faults, personalize, privacy, scaffold, shards, site_state
from fedad.federated.families.registry import family_for
from fedad.federated.histogram import session as histogram
from fedad.federated.task import Settings, load_site, run_settings


def client_app(settings: Settings | None = None) -> ClientApp:
    """Return the ClientApp, configured by ``settings`` and the run config.

    Parameters
    ----------
    settings : Mapping, optional
        Flat run settings (``run-dir``, ``seed``, ``class-names``,
        ``num-features``, ``model.*``, ``train.*``,
        ``simulation.client_failure_rate``, ``simulation.failure_mode``,
        ``simulation.round_timeout``, ``client-threads``, ``attack.*``,
        ``privacy.*``). The Simulation Engine has no run config, so it passes
        them here; under ``flwr run`` the same keys come from
        ``context.run_config`` and take precedence.

    Returns
    -------
    ClientApp
        Handles ``query`` (feature sums for scaling), ``train`` and ``evaluate``;
        the privacy mods (:mod:`fedad.federated.privacy`) sit on ``train`` and
        ``evaluate`` only, since Flower's DP mods reject other messages.
    """
    defaults = dict(settings or {})
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_query(msg, context, run_settings(defaults, context.run_config))

    @app.train(mods=[privacy.train_mod(defaults)])
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, run_settings(defaults, context.run_config))

    @app.evaluate(mods=[privacy.evaluate_mod(defaults)])
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, run_settings(defaults, context.run_config))

    return app


# Entry point for `flwr run` (Deployment Engine): settings come from the run config.
app = client_app()


def handle_query(msg: Message, context: Context, settings: Settings) -> Message:
    """Reply with the row count and per-feature sums of this site's whole shard.

    Asked for class counts (a histogram run's count query, before its first
    session), reply with those of the rows the site trains on instead.
    """
    pid = int(context.node_config["partition-id"])
    config = cast(ConfigRecord, msg.content.config_records.get("config") or ConfigRecord())
    if config.get(histogram.COUNT_QUERY, False):
        family = family_for(settings)
        site = load_site(settings, pid, config, family.val_fraction())
        counts = np.bincount(site.y_train, minlength=len(family.class_names))
        record = MetricRecord({"partition-id": pid, histogram.CLASS_COUNTS: counts.tolist()})
        return Message(RecordDict({"counts": record}), reply_to=msg)
    run_dir = cast(str, settings["run-dir"])
    X, _ = shards.read_shard(shards.shard_path(run_dir, pid), shards.site_reader(pid))
    count, total, squares = scaling.site_sums(X)
    stats = MetricRecord(
        {"partition-id": pid, "count": count, "sum": total.tolist(), "sumsq": squares.tolist()}
    )
    return Message(RecordDict({"stats": stats}), reply_to=msg)


def handle_train(msg: Message, context: Context, settings: Settings) -> Message:
    """Train the received global model on the local shard; reply with the new model.

    Under ``personalize=fedper`` or ``fedrep`` the site trains its own model
    (the received body with its kept head) and replies with the body only
    (:mod:`fedad.federated.personalize.heads`). A malicious site
    (``attack.*``) poisons its reply (:func:`fedad.federated.attacks.train_site`).
    Under SCAFFOLD its gradients are corrected and it replies its control variates' change
    too (:class:`fedad.federated.scaffold.SiteControl`).
    """
    family = family_for(settings)
    family.init_runtime()
    pid = int(context.node_config["partition-id"])
    config = _config(msg)
    server_round = int(cast(int, config["server-round"]))
    run_dir = cast(str, settings["run-dir"])
    if faults.fails(settings, context, config):
        detail = faults.act_out_failure(settings, pid, server_round)
        return faults.failure_reply(msg, pid, server_round, detail)
    if settings.get("resume", False):
        site_state.restore(run_dir, pid, server_round, context.state)
    site = load_site(settings, pid, config, family.val_fraction(), state=context.state)
    received = _arrays(msg).to_numpy_ndarrays()
    control = scaffold.SiteControl(msg.content, context.state)
    family.correction = control.correction()
    arrays, metrics = attacks.train_site(
        personalize.trainer(family, settings),
        personalize.own_model(received, context.state, settings),
        site,
        config,
        settings,
        pid,
        int(context.node_config["num-partitions"]),
        seed=int(settings["seed"]) + 1000 * server_round + pid,
    )
    # Before the state is saved: the site's new control variate is part of it.
    changed = control.reply(received, arrays, metrics, float(settings["train.learning_rate"]))
    personalize.after_train(family, received, site, settings, pid, server_round)
    # Under FedPer and FedRep the head stays in the site's state, saved with it; the body travels.
    arrays = personalize.keep_head(arrays, context.state, settings)
    site_state.save(
        run_dir,
        pid,
        server_round,
        context.state,
        int(settings["simulation.checkpoint_every"]),
    )
    # MetricRecord takes a dict, invariant in its values: floats are metric values.
    metric_record = MetricRecord(cast(dict[str, Any], metrics))
    reply = RecordDict({"arrays": ArrayRecord(arrays), "metrics": metric_record, **changed})
    return Message(reply, reply_to=msg)


def handle_evaluate(msg: Message, context: Context, settings: Settings) -> Message:
    """Score the received global model on the local test slice.

    Under ``personalize=fedper`` or ``fedrep``, before the final pass, the
    site's own model instead (:func:`fedad.federated.personalize.evaluated`).
    In the final pass of a personalized run, the site's personal model too
    (:func:`fedad.federated.personalize.final_metrics`): its metrics only.
    """
    family = family_for(settings)
    family.init_runtime()
    pid = int(context.node_config["partition-id"])
    config = _config(msg)
    # The final pass over all sites measures the final model, so nothing fails there.
    if not config.get("final", False) and faults.fails(settings, context, config):
        return faults.failure_reply(msg, pid, int(cast(int, config["server-round"])))
    site = load_site(settings, pid, config, family.val_fraction(), state=context.state)
    received = _arrays(msg).to_numpy_ndarrays()
    scored = personalize.evaluated(received, context.state, config, settings, pid)
    metrics = family.site_metrics(scored, site, config)
    metrics.update(personalize.final_metrics(family, received, site, config, settings, pid))
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def _config(msg: Message) -> ConfigRecord:
    """The ``config`` record of a server's message (a RecordDict entry is typed as any record)."""
    return cast(ConfigRecord, msg.content["config"])


def _arrays(msg: Message) -> ArrayRecord:
    """The ``arrays`` record (the global model) of a train or evaluate message."""
    return cast(ArrayRecord, msg.content["arrays"])
