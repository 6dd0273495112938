"""The SecAgg+ ClientApp: Flower's ``secaggplus_mod`` around a train handler of legacy FitRes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat

from fedad.federated import attacks, faults, site_state
from fedad.federated.client_app import handle_evaluate, handle_query
from fedad.federated.families.registry import family_for
from fedad.federated.task import Settings, load_site, run_settings

# The records of a legacy FitIns as Flower's compat layer writes them (fitins_to_recorddict).
# The config is read as a ConfigRecord, not through recorddict_to_fitins, which refuses the
# lists fedad's config holds (the pooled scaling statistics).
FITINS_PARAMETERS, FITINS_CONFIG = "fitins.parameters", "fitins.config"


def client_app(settings: Settings | None = None) -> ClientApp:
    """Return the ClientApp of a SecAgg+ run, configured by ``settings`` and the run config.

    ``query`` and ``evaluate`` are fedad's own handlers
    (:mod:`fedad.federated.client_app`); ``train`` takes the four SecAgg+
    stages through Flower's ``secaggplus_mod``, which calls the handler in
    the third (masked training) and uploads the masked, quantised update in
    place of the arrays. A mod before it acts out the injected failures
    (``simulation.client_failure_rate``) at ``secure_aggregation.failure_stage``.

    Parameters
    ----------
    settings : Mapping, optional
        Flat run settings, as :func:`fedad.federated.client_app.client_app` takes them.

    Returns
    -------
    ClientApp
    """
    defaults = dict(settings or {})
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_query(msg, context, run_settings(defaults, context.run_config))

    @app.train(mods=[drop_out(defaults), secaggplus_mod])
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, run_settings(defaults, context.run_config))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, run_settings(defaults, context.run_config))

    return app


def drop_out(defaults: Settings) -> Callable[[Message, Context, Callable], Message]:
    """The mod that makes a site fail at one SecAgg+ stage of the rounds it is down in.

    Which sites are down in a round is :func:`fedad.federated.faults.injected_failure`'s
    draw, as in a plain run; they fail at ``secure_aggregation.failure_stage`` only, having
    taken part in the stages before it. The round is the message's group id, which the
    workflow sets to the round for every stage.
    """

    def mod(msg: Message, context: Context, call_next: Callable) -> Message:
        settings = run_settings(defaults, context.run_config)
        stage = str(msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
        # flower-internal: test_secaggplus_messages
        server_round = int(msg.metadata.group_id)
        pid = int(context.node_config["partition-id"])
        down = faults.injected_failure(
            int(settings["seed"]),
            server_round,
            pid,
            int(context.node_config["num-partitions"]),
            float(settings.get("simulation.client_failure_rate", 0.0)),
        )
        if down and stage == settings.get("secure_aggregation.failure_stage"):
            detail = faults.act_out_failure(settings, pid, server_round)
            return faults.failure_reply(msg, pid, server_round, f" (SecAgg+ {stage}){detail}")
        return cast(Message, call_next(msg, context))

    return mod


def handle_train(msg: Message, context: Context, settings: Settings) -> Message:
    """Train the received global model on the local shard; reply with a legacy FitRes.

    As :func:`fedad.federated.client_app.handle_train` trains, with the model
    and config read from the FitIns records; ``secaggplus_mod`` masks the reply's
    arrays before anything leaves the site.
    """
    family = family_for(settings)
    family.init_runtime()
    pid = int(context.node_config["partition-id"])
    # flower-internal: test_secaggplus_messages
    config = cast(ConfigRecord, msg.content.config_records[FITINS_CONFIG])
    record = cast(ArrayRecord, msg.content.array_records[FITINS_PARAMETERS])
    weights = parameters_to_ndarrays(compat.arrayrecord_to_parameters(record, keep_input=True))
    server_round = int(cast(int, config["server-round"]))
    run_dir = cast(str, settings["run-dir"])
    if settings.get("resume", False):
        site_state.restore(run_dir, pid, server_round, context.state)
    site = load_site(settings, pid, config, family.val_fraction(), state=context.state)
    arrays, metrics = attacks.train_site(
        family,
        weights,
        site,
        config,
        settings,
        pid,
        int(context.node_config["num-partitions"]),
        seed=int(settings["seed"]) + 1000 * server_round + pid,
    )
    site_state.save(
        run_dir, pid, server_round, context.state, int(settings["simulation.checkpoint_every"])
    )
    # The weight SecAgg+ scales the update by (num_examples / max_weight) before masking it.
    scalars: dict[str, Any] = {k: v for k, v in metrics.items() if k != "num-examples"}
    fitres = FitRes(
        Status(Code.OK, ""), ndarrays_to_parameters(arrays), int(metrics["num-examples"]), scalars
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
