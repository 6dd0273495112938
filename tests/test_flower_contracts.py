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


def test_secaggplus_workflow_state():
    from flwr.server import LegacyContext
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    needed = "fedad.federated.secagg.server.run_rounds sets them before each workflow call"
    _contract(
        (MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key.CURRENT_ROUND)
        == ("config", "parameters", "current_round"),
        "the legacy workflows read the round and model from context.state's 'config' "
        "(current_round) and 'parameters' records",
        needed,
    )
    setup = inspect.getsource(SecAggPlusWorkflow.setup_stage)
    unmask = inspect.getsource(SecAggPlusWorkflow.unmask_stage)
    _contract(
        "context.state.array_records[MAIN_PARAMS_RECORD]" in setup
        and "cfg[WorkflowKey.CURRENT_ROUND]" in setup
        and "context.state.array_records[MAIN_PARAMS_RECORD] = arr_record" in unmask,
        "SecAggPlusWorkflow reads the model and round from context.state and writes the new "
        "model there",
        needed,
    )
    _contract(
        "fitres.parameters = parameters" in unmask and "context.strategy.aggregate_fit(" in unmask,
        "SecAggPlusWorkflow hands the strategy's aggregate_fit the unmasked aggregate in every "
        "result, not the sites' updates",
        "fedad.federated.secagg.server.MaskedMean averages them (the mean of equal arrays)",
    )
    call = inspect.getsource(SecAggPlusWorkflow.__call__)
    _contract(
        '"Secure aggregation halted.")\n                return' in call,
        "SecAggPlusWorkflow only logs a halted round and returns, without calling aggregate_fit",
        "fedad.federated.secagg.server._check_round detects a halt by aggregate_fit not called",
    )
    params = list(inspect.signature(GridClientProxy.__init__).parameters)
    _contract(
        params == ["self", "node_id", "grid", "run_id"]
        and "client_manager" in inspect.signature(LegacyContext.__init__).parameters,
        f"GridClientProxy(node_id, grid, run_id) is {params}; LegacyContext(client_manager=)",
        "fedad.federated.secagg.server.run_rounds registers the sites itself, in partition order",
    )


def test_secaggplus_messages():
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.client.mod.secure_aggregation import secaggplus_mod
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server.workflow import SecAggPlusWorkflow

    from fedad.federated import secagg
    from fedad.federated.grid import config_bytes
    from fedad.federated.secagg import client

    _contract(
        Stage.all() == secagg.STAGES
        and (RECORD_KEY_CONFIGS, Key.STAGE)
        == (
            "secaggplus_configs",
            "stage",
        ),
        "SecAgg+'s stages and the 'secaggplus_configs' record's 'stage' key",
        "fedad.federated.secagg.server.stage_of and client.drop_out name the stage by them",
    )
    workflow = inspect.getsource(SecAggPlusWorkflow)
    _contract(
        workflow.count("group_id=str(") == 4,
        "every SecAgg+ stage's message has the round as its group_id",
        "fedad.federated.secagg.client.drop_out reads the round from it",
    )
    content = compat.fitins_to_recorddict(
        FitIns(ndarrays_to_parameters([np.zeros(2)]), {"server-round": 1}), keep_input=True
    )
    _contract(
        isinstance(content.get(client.FITINS_PARAMETERS), ArrayRecord)
        and isinstance(content.get(client.FITINS_CONFIG), ConfigRecord),
        f"fitins_to_recorddict writes {list(content)}",
        "fedad.federated.secagg.client.handle_train reads the FitIns records by these names",
    )
    mod = inspect.getsource(secaggplus_mod)
    _contract(
        "call_next(msg, ctxt)" in mod and "arr_record.clear()" in mod,
        "secaggplus_mod calls the train handler in the masked stage and clears its arrays",
        "fedad.federated.secagg.client: the handler's FitRes never leaves the site unmasked",
    )
    record = ConfigRecord({"pk": [b"ab", b"cde"], "n": [1, 2], "x": 0.5, "ok": True, "s": "hi"})
    _contract(
        config_bytes(record) == record.count_bytes(),
        "ConfigRecord.count_bytes counts str/bytes by length, numbers as 8 and bools as 1 byte",
        "fedad.federated.grid.config_bytes counts as it does (and where it raises: empty values)",
    )


def test_ray_backend_terminate():
    needed = (
        "fedad.federated.engine._backend_adopts replaces it in a Hydra multirun, so that the next "
        "job can have the actors and Ray (EngineStart.keep); simulate() ends them itself"
    )
    terminate = inspect.getsource(RayBackend.terminate)
    _contract(
        "terminate_all_actors()" in terminate and "ray.shutdown()" in terminate,
        "RayBackend.terminate ends the pool's actors and shuts Ray down",
        needed,
    )
    params = list(inspect.signature(RayBackend.terminate).parameters)
    _contract(params == ["self"], f"RayBackend.terminate() takes {params[1:]}", needed)
    _contract(
        "backend.terminate()" in inspect.getsource(vce_api.run_api),
        "vce_api.run_api ends the simulation with backend.terminate()",
        needed,
    )
    _contract(
        "if not ray.is_initialized()" in inspect.getsource(RayBackend.init_ray),
        "RayBackend.init_ray starts Ray only where none is running",
        "fedad.federated.engine.simulate starts Ray itself (_start_ray), or a kept engine's runs",
    )
    pool = inspect.getsource(BasicActorPool)
    _contract(
        "self.num_actors = 0" in pool and "self.num_actors += num_actors" in pool,
        "BasicActorPool.num_actors counts the actors added (idle in .pool or busy)",
        "fedad.federated.engine.simulate keeps a multirun's actors only when all are idle",
    )
