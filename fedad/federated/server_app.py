"""Flower ServerApp: pooled scaling statistics, the strategy's rounds and the run's outputs."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedad import rundir
from fedad.config import section
from fedad.config.resolvers import sampled_sites
from fedad.data import scaling
from fedad.errors import FedadError
from fedad.evaluation.decision import PROBABILITY_EDGES, Rule, threshold_from_counts
from fedad.federated import attacks, checkpoint, privacy, secagg, shards
from fedad.federated.families.base import Family
from fedad.federated.families.registry import family_for
from fedad.federated.grid import PAYLOAD, POLL_SECONDS, SiteGrid
from fedad.federated.histogram import pinning
from fedad.federated.histogram.strategy import COLLECTIVE_BYTES, FedXgbHistogram
from fedad.federated.rounds import Rounds, ServerEvaluator, pool_counts
from fedad.federated.stopping import EarlyStopping, StopTraining
from fedad.federated.strategies import build_strategy
from fedad.federated.task import (
    ASK_SCORES,
    SCORE_ATTACK,
    SCORE_NORMAL,
    Settings,
    run_settings,
)

log = logging.getLogger(__name__)

# Flower's own default for how long a round waits for replies.
DEFAULT_ROUND_TIMEOUT = 3600.0
# Payload is reported in MB of 10^6 bytes.
MB = 1e6
# The final model is evaluated at every site up to this many, else at a sample of this many.
FINAL_EVAL_SITES = 100
# The pooled scaling statistics come from every site up to this many, else from a sample of
# this many, once the engine has said which node holds which partition (the Simulation
# Engine does): a query costs milliseconds a site, minutes at 10,000 sites, and a sample of
# 1,000 sites' sums pins the mean and spread down as well as all of them.
SCALING_SITES = 1000
# Seed streams of the two samples of sites.
FINAL_EVAL_STREAM, SCALING_STREAM = 0, 1
# How long the ServerApp waits for the engine's node-to-partition map before asking the sites.
PARTITIONS_WAIT = 60.0


def server_app(
    settings: Settings | None = None,
    stop: threading.Event | None = None,
    partitions: Future | None = None,
) -> ServerApp:
    """Return the ServerApp, configured by ``settings`` and the run config.

    Parameters
    ----------
    settings : Mapping, optional
        Flat run settings (see :func:`run_server`). The Simulation Engine has
        no run config, so it passes them here; under ``flwr run`` the same keys
        come from ``context.run_config`` and take precedence.
    stop : threading.Event, optional
        Set when the simulation is interrupted; the ServerApp then stops
        waiting for replies, saves its checkpoint and ends (see :class:`SiteGrid`).
    partitions : concurrent.futures.Future, optional
        The engine's ``{node id: partition id}``, once it has registered the
        sites (:func:`fedad.federated.engine.simulate`); see :func:`run_server`.

    Returns
    -------
    ServerApp
    """
    defaults = dict(settings or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        values = run_settings(defaults, context.run_config)
        if not defaults:
            # Under `flwr run` this is a process of its own, whose output `flwr log`
            # shows; without a handler fedad's per-round line would be dropped there.
            _log_to_stderr()
        if "run-dir" not in values:
            raise FedadError(
                "The ServerApp got no run-dir in its run config. Prepare the run with "
                "`python -m fedad.deployment` and pass the run_config.toml it writes to "
                "`flwr run --run-config` (see docs/deployment.md)."
            )
        run_server(grid, values, stop, partitions)

    return app


def _log_to_stderr() -> None:
    logger = logging.getLogger("fedad")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s fedad: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


# Entry point for `flwr run` (Deployment Engine): settings come from the run config.
app = server_app()


def run_server(
    grid: Grid,
    settings: Settings,
    stop: threading.Event | None = None,
    partitions: Future | None = None,
) -> None:
    """Run the whole federated job and write its outputs to ``run-dir``.

    Steps: a ``query`` round collects each site's row count and feature sums
    and pools them into a global mean and standard deviation (no raw row
    leaves a site; past :data:`SCALING_SITES` sites, a seeded sample of that
    many answers, when ``partitions`` says which node holds which
    partition); the strategy then runs ``num_rounds`` rounds of training,
    client evaluation and server evaluation on the global test set; a final
    evaluation pass over every site measures the final model per site.

    Scaling: with ``simulation.scaling = federated`` the pooled statistics go
    to the sites in every train/evaluate config; with ``local`` each site
    scales with its own shard's statistics. The server always scales the
    global test set with the pooled statistics: it holds no site's data, and
    the pooled statistics are the best estimate of the population the global
    model serves.

    Early stopping: with ``simulation.stop.patience`` above 0,
    ``num_rounds`` is the most rounds; every site then sends its validation
    slice's counts with each evaluation, and training ends once the pooled
    ``simulation.stop.metric`` has not improved for ``patience`` rounds
    (:class:`~fedad.federated.rounds.Rounds`). The best round's global model
    is the one the final evaluation at the sites scores and the one saved;
    ``history.csv`` holds every round run, with ``val_loss``,
    ``val_macro_f1`` and ``best_round``.

    Attacks and privacy: under a targeted attack (``attack.*``) each round's
    row holds the attack success on the global test set; under differential
    privacy (``privacy.*``) the strategy runs inside Flower's DP wrapper and
    each row holds the epsilon spent so far (:mod:`fedad.federated.privacy`).

    Checkpoints and faults: after every ``simulation.checkpoint_every`` rounds
    (round 0 and the last included) the global model, the strategy's state and
    the history go to ``run-dir/checkpoint`` (see :mod:`fedad.federated.checkpoint`);
    with ``resume`` set the run continues from there. Each exchange waits
    ``simulation.round_timeout`` seconds at most; failed sites are logged and
    counted, and a training round with fewer good replies than
    ``simulation.min_clients`` stops the run with :class:`FedadError` after
    the last complete round is checkpointed.

    Parameters
    ----------
    grid : Grid
        From Flower.
    settings : Mapping
        ``run-dir``, ``seed``, ``num-clients``, ``num-features``,
        ``class-names`` (JSON list), ``model.*``, ``train.*``, ``strategy.*``,
        ``simulation.*`` (``num_rounds``, ``fraction_train``,
        ``fraction_evaluate``, ``min_clients``, ``scaling``, ``round_timeout``,
        ``checkpoint_every``), ``resume`` (bool) and ``fingerprint`` (JSON,
        stored with each checkpoint).
    stop : threading.Event, optional
        See :class:`SiteGrid`.
    partitions : concurrent.futures.Future, optional
        The engine's ``{node id: partition id}``; without it (``flwr run``),
        every site is asked, which also says which node holds which partition.

    Notes
    -----
    Writes ``history.csv`` (one row per round, round 0 = initial model),
    ``clients.csv`` (per-site metrics of the final model), ``global_model.keras``
    and ``scaling.npz`` (the pooled ``mean``/``std`` the model's inputs need).
    """
    run_dir = Path(str(settings["run-dir"]))
    seed = int(settings["seed"])
    num_rounds = int(settings["simulation.num_rounds"])
    timeout = float(settings.get("simulation.round_timeout", DEFAULT_ROUND_TIMEOUT))
    previous = checkpoint.load(run_dir) if settings.get("resume", False) else None
    done = previous.round if previous else 0
    sites = SiteGrid(grid, stop)

    node_ids = _wait_for_nodes(sites, int(settings["num-clients"]))
    if partitions is not None:
        sites.partition_of.update(_engine_partitions(partitions, sites))
    counts, mean, std = _pooled_statistics(sites, node_ids, seed)
    np.savez(run_dir / rundir.SCALING_FILE, mean=mean, std=std, sites=len(counts))
    config = ConfigRecord()
    if settings["simulation.scaling"] == "federated":
        config = ConfigRecord({"scale-mean": mean.tolist(), "scale-std": std.tolist()})

    family = family_for(settings)
    family.seed_initial(seed)
    X_test, y_test = shards.read_shard(shards.test_path(run_dir), "server")
    dp = privacy.settings_of(settings)
    strategy = build_strategy(
        section(settings, "strategy"),
        float(settings["simulation.fraction_train"]),
        float(settings["simulation.fraction_evaluate"]),
        int(settings["simulation.min_clients"]),
        weight_key=privacy.WEIGHT_KEY if dp["name"] in privacy.CENTRAL else None,
    )
    # The strategy Flower drives: under DP, Flower's wrapper and fedad's accounting around it.
    runner = strategy
    if dp["name"] != "none":
        sim = {**section(settings, "simulation"), "num_clients": len(node_ids)}
        runner = privacy.Private(strategy, dp, len(node_ids), sampled_sites(sim))
    stopping = EarlyStopping.from_settings(settings)
    if previous:
        checkpoint.restore_strategy_state(strategy, previous.strategy_state)
        family.restore(previous.history[-1])
        if isinstance(runner, privacy.Private):
            runner.restore(previous.history[-1])
        if previous.stopping is not None:
            stopping.restore(previous.stopping, previous.best_arrays)
        log.info("resuming after round %d of %d from %s", done, num_rounds, run_dir)
    rounds = Rounds(runner, done, seed, int(settings["simulation.min_clients"]), family, stopping)
    checkpointer = checkpoint.Checkpointer(
        run_dir,
        int(settings.get("simulation.checkpoint_every", 1)),
        num_rounds,
        json.loads(str(settings.get("fingerprint", "{}"))),
        strategy,
        saved_round=done if previous else None,
    )
    evaluator = ServerEvaluator(
        family,
        scaling.standardize(X_test, mean, std),
        y_test,
        num_rounds,
        sites,
        rounds,
        checkpointer,
        previous.history if previous else [],
        targets=attacks.targets(settings, family.class_names),
        fields=_history_fields(runner, strategy),
    )
    try:
        # Early stopping ends training before a round (Rounds.configure_train raises), every
        # round before it complete; not flwr 1.43's Strategy.should_stop: fedad pins flwr
        # < 1.43 (see Rounds).
        with contextlib.suppress(StopTraining):
            # Under SecAgg+ (secure_aggregation=secaggplus) a loop of Flower's legacy workflow.
            secagg.round_loop(rounds, settings)(
                grid=sites,
                initial_arrays=ArrayRecord(
                    previous.arrays if previous else family.initial_arrays()
                ),
                num_rounds=num_rounds - done,
                timeout=timeout,
                train_config=ConfigRecord(dict(config)),
                evaluate_config=ConfigRecord(dict(config)),
                evaluate_fn=evaluator,
            )
        evaluator.close()
        # The last round is saved whatever checkpoint_every says, so that resuming a run
        # that stopped early does not train again the rounds after the last checkpoint.
        checkpointer.flush()
        if stopping.on:
            log.info(stopping.message(num_rounds))
    except Exception as error:
        # Whatever stopped the run, the last complete round is still worth keeping: its
        # evaluation is waited for (an error there is the one to report, if any).
        failure = error
        try:
            evaluator.close()
        except Exception as evaluation:
            failure = evaluation
        saved = checkpointer.flush()
        if isinstance(failure, FedadError) and saved is not None:
            raise FedadError(
                f"{failure} The run stopped; its state after round {saved} is checkpointed in "
                f"{run_dir}: continue it with the same settings plus resume={run_dir} once the "
                "sites are back (or with a lower simulation.min_clients)."
            ) from None
        raise failure from None
    finally:
        if isinstance(strategy, FedXgbHistogram):
            strategy.close()

    final_arrays = _kept_model(evaluator, stopping, family)
    final_config = ConfigRecord(
        {
            **config,
            **family.evaluate_config(),
            "server-round": num_rounds,
            "final": True,
            # A calibrated decision's threshold comes from this pass over the kept model.
            **({ASK_SCORES: True} if family.calibrated else {}),
        }
    )
    fraction = settings.get("simulation.final_eval_fraction")
    chosen = final_evaluation_sites(
        len(node_ids), None if fraction in (None, "") else float(fraction), seed
    )
    clients, pooled = _final_site_metrics(
        sites, final_arrays, final_config, counts, len(node_ids), timeout, chosen
    )
    clients.to_csv(run_dir / rundir.CLIENTS_FILE, index=False)
    if family.calibrated:
        _save_threshold(run_dir, family.decision, pooled)
    # The final pass over every site is the last exchange: counted with the last round.
    for key, value in sites.take_payload().items():
        evaluator.rows[-1][key] += value
    _history(evaluator.rows).to_csv(run_dir / rundir.HISTORY_FILE, index=False)
    family.save(final_arrays.to_numpy_ndarrays(), run_dir)
    if isinstance(strategy, FedXgbHistogram) and strategy.cuts is not None:
        pinning.save(run_dir, strategy.cuts, strategy.pooled_counts)


def _history_fields(runner: Any, strategy: Any) -> Callable[[], dict] | None:
    """What each history row gains from the strategy: the DP budget, the collective's bytes."""
    # Without DP the runner is the strategy itself: asked once, as its fields are taken.
    owners = {
        id(s): s for s in (runner, strategy) if isinstance(s, privacy.Private | FedXgbHistogram)
    }
    if not owners:
        return None
    return lambda: {k: v for s in owners.values() for k, v in s.history_fields().items()}


def _kept_model(evaluator: ServerEvaluator, stopping: EarlyStopping, family: Family) -> ArrayRecord:
    """The global model a run keeps, scores at every site and saves.

    With early stopping on, its best round's (and the family's state of that
    round: the autoencoder's threshold, from the round's history row); else,
    or when no round was measured, the last round's, which the evaluator
    kept as it scored each round.
    """
    if stopping.on and stopping.best_arrays is not None:
        row = next(r for r in evaluator.rows if r["round"] == stopping.best_round)
        family.restore(row)
        return ArrayRecord(stopping.best_arrays)
    return cast(ArrayRecord, evaluator.arrays)


def _wait_for_nodes(sites: SiteGrid, expected: int, timeout: float = 300.0) -> list[int]:
    """Return the node ids once all ``expected`` sites are connected.

    Simulated sites are there at once; under `flwr run` the SuperNodes may
    connect after the run starts, so a missing one gets a message naming the fix.
    """
    deadline = time.monotonic() + timeout
    while len(node_ids := sites.get_node_ids()) < expected:
        sites.check_stop()
        if time.monotonic() > deadline:
            raise FedadError(
                f"Only {len(node_ids)} of the {expected} sites connected within {timeout:g} s. "
                "Every site needs a SuperNode connected to this SuperLink, started with "
                f'--node-config "partition-id=<i> num-partitions={expected}" for i = 0 .. '
                f"{expected - 1} (see docs/deployment.md)."
            )
        time.sleep(POLL_SECONDS)
    return node_ids


def _engine_partitions(partitions: Future, sites: SiteGrid) -> dict[int, int]:
    """The engine's ``{node id: partition id}``; empty if it has not come within the wait."""
    deadline = time.monotonic() + PARTITIONS_WAIT
    while time.monotonic() < deadline:
        sites.check_stop()
        try:
            return partitions.result(timeout=POLL_SECONDS)
        except TimeoutError:
            continue
    log.warning("the engine did not say which node holds which partition: asking every site")
    return {}


def _pooled_statistics(
    sites: SiteGrid, node_ids: list[int], seed: int
) -> tuple[dict[int, int], np.ndarray, np.ndarray]:
    """Query the sites' sums; return rows per partition asked, pooled mean and std.

    Every site is asked unless ``sites`` already knows every node's partition
    and there are more than :data:`SCALING_SITES`: then a seeded sample of that
    many is. Also teaches ``sites`` which node holds which partition. No
    timeout: the replies wait for the sites' start-up (Ray actors importing
    TensorFlow).
    """
    asked = node_ids
    if len(node_ids) > SCALING_SITES and set(node_ids) <= sites.partition_of.keys():
        node_of = {pid: node for node, pid in sites.partition_of.items()}
        sample = sample_sites(len(node_ids), SCALING_SITES, seed, SCALING_STREAM)
        asked = [node_of[pid] for pid in sample]
    messages = [
        Message(
            RecordDict({"config": ConfigRecord()}), dst_node_id=n, message_type=MessageType.QUERY
        )
        for n in asked
    ]
    replies = sites.send_and_receive(messages)
    errors = [m.error.reason for m in replies if m.has_error()]
    if errors or len(replies) != len(asked):
        raise RuntimeError(f"the scaling-statistics query failed at some sites: {errors}")
    counts, sums = {}, []
    for reply in replies:
        # The query reply's MetricRecord: scalars, and the sums as lists.
        stats = cast(Mapping[str, Any], reply.content["stats"])
        pid = int(stats["partition-id"])
        sites.partition_of[reply.metadata.src_node_id] = pid
        counts[pid] = int(stats["count"])
        sums.append((counts[pid], np.asarray(stats["sum"]), np.asarray(stats["sumsq"])))
    mean, std = scaling.pooled_moments(sums)
    return counts, mean, std


def final_evaluation_sites(n_sites: int, fraction: float | None, seed: int) -> list[int]:
    """The partition ids the final model is evaluated at (``simulation.final_eval_fraction``).

    Parameters
    ----------
    n_sites : int
        Sites of the run.
    fraction : float or None
        The share of sites; None: every site up to :data:`FINAL_EVAL_SITES`,
        then a sample of that many.
    seed : int
        The run's seed: the sample is the same in every run.

    Returns
    -------
    list[int]
        Sorted partition ids; at least one.
    """
    count = FINAL_EVAL_SITES if fraction is None else round(fraction * n_sites)
    return sample_sites(n_sites, max(1, count), seed, FINAL_EVAL_STREAM)


def sample_sites(n_sites: int, count: int, seed: int, stream: int) -> list[int]:
    """``count`` of the partition ids ``0 .. n_sites-1`` (all if fewer), the same for a seed.

    ``stream`` keeps the run's samples of sites (:data:`FINAL_EVAL_STREAM`,
    :data:`SCALING_STREAM`) apart; the final evaluation's is the stream of
    seed ``(seed, n_sites)``, as before there were two.
    """
    if count >= n_sites:
        return list(range(n_sites))
    key = (seed, n_sites, stream) if stream else (seed, n_sites)
    chosen = np.random.default_rng(key).permutation(n_sites)[:count]
    return sorted(int(i) for i in chosen)


def _final_site_metrics(
    sites: SiteGrid,
    arrays: ArrayRecord,
    config: ConfigRecord,
    counts: dict[int, int],
    n_sites: int,
    timeout: float,
    chosen: list[int],
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Evaluate the final global model at the ``chosen`` sites; one row per site of the run.

    Sites not chosen have ``evaluated`` False and no metrics; a chosen site
    that failed has its ``error``. ``n_examples`` (the shard's rows) is known
    for the sites the scaling query asked (``counts``), empty for the others.
    The replies' counts (``sum-`` metrics) are summed apart, not kept per site.
    In a personalized run each site adds its personal model's metrics on the
    same slice (``personal_`` columns: :mod:`fedad.federated.personalize`).
    """
    node_of = {pid: node for node, pid in sites.partition_of.items()}
    messages = [
        Message(
            RecordDict({"arrays": arrays, "config": config}),
            dst_node_id=node_of[pid],
            message_type=MessageType.EVALUATE,
        )
        for pid in chosen
    ]
    rows: dict[int, dict[str, Any]] = {
        pid: {"client": pid, "n_examples": counts.get(pid), "evaluated": False}
        for pid in range(n_sites)
    }
    for pid in chosen:
        rows[pid]["evaluated"] = True
    replies = list(sites.send_and_receive(messages, timeout=timeout))
    pooled = pool_counts(replies)
    for reply in replies:
        row = rows[sites.partition_of[reply.metadata.src_node_id]]
        if reply.has_error():
            row["error"] = reply.error.reason
        else:
            metrics = dict(reply.content["metrics"])
            row["n_test"] = metrics.pop("num-examples")
            row.update(metrics)
    return pd.DataFrame([rows[pid] for pid in sorted(rows)]), pooled


def _save_threshold(run_dir: Path, decision: Rule, pooled: Mapping[str, Any]) -> None:
    """The calibrated threshold of the kept model, from the sites' pooled score counts.

    Written to ``threshold.json`` beside the model: the scorer of the run and its
    detector decide by it. Counts only reached the server (no row's score).
    """
    normal = pooled.get(SCORE_NORMAL, [0] * (len(PROBABILITY_EDGES) - 1))
    attack = pooled.get(SCORE_ATTACK, [0] * (len(PROBABILITY_EDGES) - 1))
    threshold = threshold_from_counts(
        PROBABILITY_EDGES,
        np.asarray(normal),
        np.asarray(attack),
        decision.rule,
        decision.target_fpr,
    )
    rundir.write_json(
        run_dir / rundir.THRESHOLD_FILE,
        {
            "threshold": threshold,
            "rule": decision.rule,
            "target_fpr": decision.target_fpr,
            "chosen_on": "counts of the sites' validation rows' attack scores",
            "validation_rows": int(sum(normal) + sum(attack)),
        },
    )


def _history(rows: list[dict]) -> pd.DataFrame:
    """The rows as a table: metrics, payload (and the cumulative MB), failures and timings."""
    history = pd.DataFrame(rows)
    # A histogram run's allreduces move bytes beside Flower's messages (counted by formula).
    moved = [*PAYLOAD, *([COLLECTIVE_BYTES] if COLLECTIVE_BYTES in history else [])]
    history["mb_cumulative"] = history[moved].fillna(0).sum(axis=1).cumsum() / MB
    tail = [*moved, "mb_cumulative", "failures", "eval_failures", "seconds", "started_at"]
    return history[[c for c in history.columns if c not in tail] + tail]
