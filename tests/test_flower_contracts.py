"""Flower and flwr-datasets internals fedad relies on: one fast test each, naming who needs it.

An upgrade that moves one of them fails here first, with a message saying what moved
and which fedad code must follow, instead of a run that misbehaves quietly. Code that
reaches into one carries a ``# flower-internal: <test name>`` comment naming its test
here (tests/test_layout.py checks that every such access has one).
"""

from __future__ import annotations

import inspect
import random

import numpy as np
import pytest
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.simulation.ray_transport.ray_actor import BasicActorPool, ClientAppActor
from flwr_datasets.partitioner import DirichletPartitioner

from fedad.federated import checkpoint


def _contract(ok: bool, internal: str, needed_by: str) -> None:
    assert ok, f"Flower internal changed: {internal}. fedad code that relies on it: {needed_by}."


def test_engine_loop():
    params = list(inspect.signature(vce_api.add_messages_to_queue).parameters)
    _contract(
        params == ["state", "queue", "nodes_mapping", "f_stop"],
        f"flwr...vce_api.add_messages_to_queue(state, queue, nodes_mapping, f_stop) is {params}",
        "fedad.federated.engine._pickup_from_waiting_nodes replaces it",
    )
    _contract(
        "nodes_mapping[node_id] = i" in inspect.getsource(vce_api._register_nodes),
        "vce_api._register_nodes maps each node id to its partition id (nodes_mapping)",
        "fedad.federated.engine._pickup_from_waiting_nodes hands that map to the ServerApp",
    )


def test_in_memory_state():
    needed = "fedad.federated.engine._pickup_from_waiting_nodes reads and wraps these"
    source = inspect.getsource(InMemoryLinkState.__init__)
    _contract("self.message_ins_store" in source, "InMemoryLinkState.message_ins_store", needed)
    _contract("self.lock" in source, "InMemoryLinkState.lock", needed)
    _contract(
        callable(getattr(InMemoryLinkState, "store_message_ins", None)),
        "InMemoryLinkState.store_message_ins",
        needed,
    )
    handed_out = inspect.getsource(InMemoryLinkState.get_message_ins)
    for step in ("self._check_stored_messages(", 'delivered_at == ""', "delivered_at = "):
        _contract(
            step in handed_out,
            f"InMemoryLinkState.get_message_ins no longer does `{step}`",
            needed + " (it hands messages out the same way)",
        )
    params = list(inspect.signature(InMemoryLinkState._check_stored_messages).parameters)
    _contract(
        params[:2] == ["self", "message_ids"],
        f"InMemoryLinkState._check_stored_messages(message_ids) takes {params}",
        needed,
    )


def test_actor_pool():
    needed = "fedad.federated.engine._actors_killed_at_the_end kills them with ray.kill"
    source = inspect.getsource(BasicActorPool.__init__)
    _contract("self.pool" in source, "BasicActorPool.pool (idle actors)", needed)
    _contract("self._future_to_actor" in source, "BasicActorPool._future_to_actor (busy)", needed)
    _contract(
        callable(getattr(BasicActorPool, "terminate_all_actors", None)),
        "BasicActorPool.terminate_all_actors",
        needed,
    )


def test_ray_backend():
    needed = (
        "fedad.federated.engine.EngineStart builds the pool early; _backend_adopts hands it over"
    )
    build = inspect.getsource(RayBackend.build)
    _contract(
        "self.pool = BasicActorPool(" in build and "self.app_fn = app_fn" in build,
        "RayBackend.build sets self.pool (a BasicActorPool) and self.app_fn",
        needed,
    )
    params = list(inspect.signature(BasicActorPool.__init__).parameters)
    _contract(
        params == ["self", "actor_type", "client_resources", "actor_kwargs"],
        f"BasicActorPool(actor_type, client_resources, actor_kwargs) takes {params[1:]}",
        needed,
    )
    _contract(
        "actors_capacity" in inspect.getsource(BasicActorPool.__init__),
        "BasicActorPool.actors_capacity",
        needed,
    )
    init = inspect.getsource(ClientAppActor.__ray_metadata__.modified_class.__init__)
    _contract(
        "on_actor_init_fn()" in init,
        "ClientAppActor(on_actor_init_fn) calls it as the actor starts",
        needed + " (each actor imports the model's framework as it starts)",
    )


def test_actor_options():
    source = inspect.getsource(BasicActorPool.__init__)
    _contract(
        ".options(" in source and "**client_resources" in source,
        "BasicActorPool passes client_resources to Ray's actor .options(**...)",
        "fedad.federated.engine.simulate adds max_restarts and max_task_retries there",
    )


@pytest.mark.parametrize("strategy", [FedAdam, FedYogi, FedAdagrad, FedAvgM])
def test_strategy_state(strategy):
    kwargs = {"server_momentum": 0.9} if strategy is FedAvgM else {}
    instance = strategy(**kwargs)
    for name in checkpoint.STATE_ATTRIBUTES[strategy.__name__]:
        _contract(
            hasattr(instance, name),
            f"{strategy.__name__}.{name} (state carried between rounds)",
            "fedad.federated.checkpoint.STATE_ATTRIBUTES saves and restores it for resume=",
        )


def test_sampling_random():
    class Nodes:
        def get_node_ids(self):
            return list(range(100))

    draws = []
    for _ in range(2):
        random.seed("fedad")
        draws.append(sample_nodes(Nodes(), 2, 10)[0])
    _contract(
        draws[0] == draws[1],
        "strategy_utils.sample_nodes samples with the module-level random",
        "fedad.federated.rounds.Rounds seeds it per round, so a seed picks the same sites",
    )


def test_dirichlet_private_method():
    method = getattr(DirichletPartitioner, "_determine_partition_id_to_indices_if_needed", None)
    source = inspect.getsource(method) if method else ""
    _contract(
        "self._rng" in source,
        "DirichletPartitioner._determine_partition_id_to_indices_if_needed draws with self._rng",
        "fedad.data.partition._RestartingDirichlet overrides it to redraw with derived seeds",
    )
    partitioner = DirichletPartitioner(2, "label", 0.5, seed=3)
    _contract(
        partitioner._seed == 3 and isinstance(partitioner._rng, np.random.Generator),
        "DirichletPartitioner._seed and ._rng",
        "fedad.data.partition._RestartingDirichlet resets them per redraw",
    )


def test_engine_loop_stop():
    source = inspect.getsource(vce_api.add_messages_to_queue)
    _contract(
        "f_stop.is_set()" in source,
        "vce_api.add_messages_to_queue stops on f_stop.is_set()",
        "fedad.federated.engine._pickup_from_waiting_nodes loops the same way",
    )
