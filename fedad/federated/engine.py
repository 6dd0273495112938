"""The one place that starts Flower's Simulation Engine on Ray."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping

import ray
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation


def simulate(
    server_app: ServerApp,
    client_app: ClientApp,
    num_clients: int,
    client_resources: Mapping[str, float],
    ray_init_args: Mapping | None = None,
    address: str | None = None,
) -> None:
    """Run ``server_app`` against ``num_clients`` virtual sites on Ray, then stop Ray.

    Parameters
    ----------
    server_app, client_app : ServerApp, ClientApp
        The apps; the ServerApp runs in a thread of this process and writes
        the outputs, the ClientApp runs in Ray actors.
    num_clients : int
        Number of virtual SuperNodes; partition ids are ``0 .. num_clients-1``.
    client_resources : Mapping
        Ray resources per actor (``num_cpus``, ``num_gpus``); the actor pool
        holds as many actors as the cluster fits.
    ray_init_args : Mapping, optional
        Extra keyword arguments for ``ray.init``.
    address : str, optional
        Attach to this Ray cluster (``"auto"``, ``"ray://head:10001"``)
        instead of starting a local one.

    Notes
    -----
    ``ray.shutdown()`` runs even when the simulation fails, so the next run
    in the same process (a Hydra multirun) starts clean.
    """
    init_args = dict(ray_init_args or {})
    if address:
        init_args["address"] = address
    # Actor output is TensorFlow's start-up chatter; client errors still reach
    # this process as error replies. `ray_init_args.log_to_driver: true` shows it.
    init_args.setdefault("log_to_driver", False)
    backend_config = {
        "client_resources": {k: float(v) for k, v in client_resources.items()},
        "init_args": init_args,
    }
    # Flower logs every step at INFO (the per-round line comes from the ServerApp),
    # and alembic, which it uses for its state, logs its plugins.
    quiet = {name: logging.getLogger(name) for name in ("flwr", "alembic")}
    levels = {name: logger.level for name, logger in quiet.items()}
    for logger in quiet.values():
        logger.setLevel(logging.WARNING)
    deprecation = _DropDeprecationNotice()
    quiet["flwr"].addFilter(deprecation)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Tip: In future versions of Ray")
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=num_clients,
                backend_config=backend_config,
            )
    finally:
        quiet["flwr"].removeFilter(deprecation)
        for name, logger in quiet.items():
            logger.setLevel(levels[name])
        ray.shutdown()


class _DropDeprecationNotice(logging.Filter):
    """Drop Flower's notice that `run_simulation` will give way to `flwr run`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in record.getMessage()
