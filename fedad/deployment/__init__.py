"""Flower's Deployment Engine: prepare a run (prepare), run it here (local), the CLI (__main__)."""

from fedad.deployment.local import LocalRun, run_local
from fedad.deployment.prepare import PreparedRun, prepare_run, write_app, write_run_config
from fedad.deployment.processes import flower_processes

__all__ = [
    "LocalRun",
    "PreparedRun",
    "flower_processes",
    "prepare_run",
    "run_local",
    "write_app",
    "write_run_config",
]
