"""A run prepared for Flower's Deployment Engine: data and shards, run config, app, commands."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from omegaconf import DictConfig, OmegaConf

from fedad import __version__, rundir
from fedad.config import FLOWER_KEYS, Settings, unflatten
from fedad.errors import FedadError
from fedad.run.pipeline import prepare_run as prepare_data
from fedad.run.validate import validate

RUN_CONFIG_FILE = "run_config.toml"
# Inside the run folder: the commands, the Flower processes' logs and their FLWR_HOME.
DEPLOYMENT_DIR = "deployment"
COMMANDS_FILE = "commands.sh"
# Inside DEPLOYMENT_DIR: the Flower App that `flwr run` bundles (see write_app).
APP_DIR = "app"
# The SuperLink connection's name in FLWR_HOME/config.toml, for `flwr run`, `flwr log`, `flwr ls`.
CONNECTION = "fedad-superlink"
# Flower's own default for the SuperLink's one HTTP port (Fleet, Control and Runtime APIs).
DEFAULT_SUPERLINK = "127.0.0.1:8000"
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
STARTUP_TIMEOUT = 60.0
STOP_GRACE_SECONDS = 5.0
# How often the run's status is asked once its log stream has ended.
STATUS_POLL_SECONDS = 5.0
# Sites listed one command each in the printed instructions; more get one template line.
LISTED_SITES = 10


@dataclass
class PreparedRun:
    """A run folder ready for ``flwr run``.

    Attributes
    ----------
    run_dir : Path
        Holds ``shards/`` (one folder per site and the global test set),
        ``config.yaml``, ``partition.csv``/``.png`` and ``run_config.toml``; the
        ServerApp writes the outputs here.
    num_sites, num_rounds : int
        Sites (SuperNodes with partition ids ``0 .. num_sites-1``) and rounds.
    run_config : Path
        The run's settings for ``flwr run --run-config``.
    """

    run_dir: Path
    num_sites: int
    num_rounds: int
    run_config: Path

    @property
    def app_dir(self) -> Path:
        """The Flower App that ``flwr run`` bundles (see :func:`write_app`)."""
        return self.run_dir / DEPLOYMENT_DIR / APP_DIR

    @property
    def flwr_home(self) -> Path:
        """FLWR_HOME of this run's Flower processes: connection config, installed app copies."""
        return self.run_dir / DEPLOYMENT_DIR / "flwr_home"


def prepare_run(cfg: DictConfig, run_dir: Path) -> PreparedRun:
    """Prepare the data, shards, run config and Flower App of a run, as the simulation does.

    The steps are the simulation's own (:func:`fedad.run.pipeline.prepare_run`,
    :func:`fedad.federated.simulation.prepare_sites`), so one seed gives the
    same shards and settings on both engines.

    Parameters
    ----------
    cfg : DictConfig
        The composed config (see :func:`fedad.config.compose`).
    run_dir : Path
        A new or empty folder.

    Returns
    -------
    PreparedRun

    Raises
    ------
    FedadError
        For a setting the Deployment Engine cannot honour (``federated=false``,
        ``resume``, ``failure_mode=crash``, SecAgg+, ``fedxgb_histogram``), a folder
        that already holds files,
        and every data or setting error the simulation raises.
    """
    from fedad.federated.simulation import prepare_sites

    validate(cfg)
    _check_supported(cfg)
    run_dir = Path(run_dir).resolve()
    if run_dir.exists() and not run_dir.is_dir():
        raise FedadError(
            f"--run-dir {run_dir} is a file, not a folder. Pass a new folder for the run."
        )
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise FedadError(
            f"{run_dir} already holds files; fedad.deployment prepares a new run folder. "
            "Pass another --run-dir, or delete this one."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    rundir.write_text(run_dir / rundir.CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
    prepared = prepare_data(cfg, run_dir)
    settings = prepare_sites(cfg, prepared.data, prepared.parts, run_dir)
    run_config = run_dir / RUN_CONFIG_FILE
    write_run_config(settings, run_config)
    write_app(run_dir / DEPLOYMENT_DIR / APP_DIR)
    return PreparedRun(run_dir, len(prepared.parts), int(cfg.simulation.num_rounds), run_config)


def _check_supported(cfg: DictConfig) -> None:
    sim = cfg.simulation
    if not cfg.federated:
        raise FedadError("federated=false leaves nothing to deploy; drop that override.")
    if cfg.resume:
        raise FedadError(
            "fedad.deployment cannot resume a run: drop resume=. To continue a run, use the "
            "Simulation Engine (python -m fedad.simulate resume=...)."
        )
    secure = cfg.get("secure_aggregation", {}).get("name", "none")
    if secure != "none":
        raise FedadError(
            f"secure_aggregation={secure} runs only under the Simulation Engine: fedad's SecAgg+ "
            "round loop drives Flower's legacy workflow, which the run config that flwr run "
            "carries does not select, so the sites would aggregate in the clear. Use "
            "python -m fedad.simulate, or drop secure_aggregation= here."
        )
    if cfg.strategy.name == "fedxgb_histogram":
        raise FedadError(
            "strategy=fedxgb_histogram runs only under the Simulation Engine: its XGBoost "
            "server listens on every interface without TLS, and SuperNodes on other machines "
            "would have to reach it in the clear. Use python -m fedad.simulate, or "
            "strategy=fedxgb_bagging or fedxgb_cyclic with the Deployment Engine."
        )
    if float(sim.client_failure_rate) > 0 and sim.failure_mode == "crash":
        raise FedadError(
            "simulation.failure_mode=crash relies on Ray restarting the killed site's actor, "
            "which the Deployment Engine does not do. Use failure_mode=error or hang, or the "
            "Simulation Engine."
        )


def write_app(folder: Path) -> Path:
    """Write the Flower App that ``flwr run`` bundles: a ``pyproject.toml`` naming fedad's apps.

    The apps' code is the installed fedad (every machine has it), so the
    bundle holds no code and works from an installed wheel as from a
    checkout. Its ``[tool.flwr.app.config]`` declares every key of
    :data:`fedad.config.FLOWER_KEYS` as ``""`` (not set): Flower refuses a
    run-config key the app does not declare.

    Parameters
    ----------
    folder : Path
        Created if needed.

    Returns
    -------
    Path
        ``folder``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    app = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "fedad-run", "version": __version__, "dependencies": []},
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedad",
                    "components": {
                        "serverapp": "fedad.federated.server_app:app",
                        "clientapp": "fedad.federated.client_app:app",
                    },
                    "config": unflatten(dict.fromkeys(FLOWER_KEYS, "")),
                }
            }
        },
    }
    (folder / "pyproject.toml").write_text(tomli_w.dumps(app))
    return folder


def write_run_config(settings: Settings, path: Path) -> Path:
    """Write ``settings`` (dotted keys) as a TOML file for ``flwr run --run-config``.

    Parameters
    ----------
    settings : Mapping
        Flat settings, e.g. from :func:`fedad.config.make_settings`.
    path : Path
        The file to write.

    Returns
    -------
    Path
        ``path``. Flower flattens the file's tables back into the same dotted keys.
    """
    undeclared = sorted(set(settings) - set(FLOWER_KEYS))
    if undeclared:
        raise FedadError(
            f"The run has settings that fedad.config.FLOWER_KEYS does not list, so `flwr run` "
            f"would refuse them: {', '.join(undeclared)}. Add each there (and to "
            "pyproject.toml's [tool.flwr.app.config])."
        )
    nested = unflatten(settings)
    header = "# fedad run settings: flwr run <fedad checkout> --run-config <this file>\n"
    path.write_text(header + tomli_w.dumps(nested))
    return path


def write_connection(flwr_home: Path, superlink: str) -> Path:
    """Write the Flower config naming the SuperLink for ``flwr run``, ``flwr log``, ``flwr ls``.

    Parameters
    ----------
    flwr_home : Path
        FLWR_HOME of the ``flwr`` commands.
    superlink : str
        ``host:port`` of the SuperLink as this machine reaches it.

    Returns
    -------
    Path
        ``flwr_home/config.toml``, whose default connection is :data:`CONNECTION`
        (insecure: no TLS).
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    config = {
        "superlink": {"default": CONNECTION, CONNECTION: {"address": superlink, "insecure": True}}
    }
    path = flwr_home / "config.toml"
    path.write_text(tomli_w.dumps(config))
    return path


def deployment_commands(run: PreparedRun, superlink: str = DEFAULT_SUPERLINK) -> str:
    """Return the shell commands that run ``run`` with a SuperLink and one SuperNode per site.

    Parameters
    ----------
    run : PreparedRun
        From :func:`prepare_run`.
    superlink : str
        ``host:port`` of the SuperLink as the sites and this machine reach it.

    Returns
    -------
    str
        Commented commands for the SuperLink host, each site and this checkout.
    """
    q = shlex.quote
    _, port = split_address(superlink)
    n = run.num_sites
    env = " ".join(f"{k}={v}" for k, v in FLOWER_ENV.items())
    shard = run.run_dir / "shards" / "client_<i>"

    def supernode(i: int | str) -> str:
        node_config = q(f"partition-id={i} num-partitions={n}")
        return f"flower-supernode --insecure --superlink {superlink} --node-config {node_config}"

    sites = [supernode(i) for i in range(n)] if n <= LISTED_SITES else [supernode("<i>")]
    return "\n".join(
        [
            f"# fedad on Flower's Deployment Engine: {_count(n, 'site')}, "
            f"{_count(run.num_rounds, 'round')}.",
            "# Every machine: fedad's dependencies installed (pip install -e <fedad checkout>),",
            "# then this environment (FLWR_HOME keeps Flower's files out of ~/.flwr):",
            f"export {env} FLWR_HOME={q(str(run.flwr_home))}",
            "",
            f"# 1. SuperLink host. Needs {run.run_dir}/shards/test/; the ServerApp writes",
            f"#    the outputs to {run.run_dir}.",
            f"flower-superlink --insecure --host 0.0.0.0 --port {port}",
            "",
            f"# 2. Each site i = 0 .. {n - 1}, holding only its own shard {shard}",
            "#    (partition ids as 4 digits: client_0000/ ...). SuperNodes sharing a",
            "#    machine need --port values of their own (default 9094).",
            *sites,
            "",
            "# 3. In the fedad checkout: start the run and follow its log.",
            f"flwr run {q(str(run.app_dir))} {CONNECTION} --run-config {q(str(run.run_config))} "
            "--stream",
            "",
        ]
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` as a pair, the port in 1..65535; a :class:`FedadError` otherwise."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise FedadError(
            f"--superlink {address}: expected host:port with a port from 1 to 65535, such as "
            f"{DEFAULT_SUPERLINK}."
        )
    return host, int(port)
