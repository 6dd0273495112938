"""`python -m fedad.deployment`: one federated run on Flower's Deployment Engine (`flwr run`)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from fedad import rundir
from fedad.config import compose
from fedad.deployment.local import run_local
from fedad.deployment.prepare import (
    COMMANDS_FILE,
    DEFAULT_SUPERLINK,
    DEPLOYMENT_DIR,
    PreparedRun,
    deployment_commands,
    prepare_run,
    split_address,
    write_connection,
)
from fedad.errors import FedadError, exit_with
from fedad.federated.stopping import BEST_ROUND

log = logging.getLogger("fedad")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _summary(run: PreparedRun) -> str:
    import pandas as pd

    history = pd.read_csv(run.run_dir / rundir.HISTORY_FILE)
    last = history.iloc[-1]
    # With early stopping the kept model is the best round's, which may come before the last.
    best = last.get(BEST_ROUND)
    kept = last if best is None or pd.isna(best) else history[history["round"] == best].iloc[0]
    ran = f"{int(last['round'])} rounds, kept " if kept["round"] != last["round"] else ""
    return (
        f"{ran}round {int(kept['round'])}: macro-F1 {kept['macro_f1']:.4f}, ROC-AUC "
        f"{kept['roc_auc']:.4f}, FPR {kept['fpr']:.4f}; outputs in {run.run_dir}"
    )


def main(argv: Sequence[str] | None = None) -> PreparedRun:
    """Command line: prepare a run for the Deployment Engine; print its commands or run it here.

    Parameters
    ----------
    argv : Sequence[str], optional
        Default: ``sys.argv[1:]``. See ``python -m fedad.deployment --help``.

    Returns
    -------
    PreparedRun
        A user error ends the process with one paragraph (status 2); Ctrl-C
        or SIGTERM with status 130, after every Flower process is stopped.
    """
    parser = argparse.ArgumentParser(
        prog="python -m fedad.deployment",
        description=(
            "Prepare a federated run of fedad for Flower's Deployment Engine: the data, one "
            "shard file per site and the run config, exactly as python -m fedad.simulate "
            "prepares them. Then print the commands for a SuperLink, one SuperNode per site "
            "and `flwr run`, or (--local) run them all on this machine."
        ),
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for fedad.simulate")
    parser.add_argument(
        "--run-dir", type=Path, help="new run folder (default: outputs/<date>/<time>)"
    )
    parser.add_argument(
        "--local",
        action="store_true",
        help="start a SuperLink and the SuperNodes here, run, wait, stop them all",
    )
    parser.add_argument(
        "--superlink",
        default=DEFAULT_SUPERLINK,
        help=f"host:port of the SuperLink in the printed commands (default {DEFAULT_SUPERLINK})",
    )
    parser.add_argument(
        "--timeout", type=float, help="with --local: seconds the run may take (default: no limit)"
    )
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")
    for name in ("alembic", "tensorflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    run_dir = args.run_dir or Path("outputs") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main else None
    try:
        split_address(args.superlink)
        run = prepare_run(compose(args.overrides), run_dir)
        write_connection(run.flwr_home, args.superlink)
        commands = deployment_commands(run, args.superlink)
        (run.run_dir / DEPLOYMENT_DIR / COMMANDS_FILE).write_text(commands)
        if not args.local:
            print(f"Prepared {run.run_dir}. To run it (also in {DEPLOYMENT_DIR}/{COMMANDS_FILE}):")
            print()
            print(commands)
            return run
        result = run_local(run, timeout=args.timeout)
        print(f"Flower run {result.run_id} {result.status} in {result.seconds:.0f} s.")
        print(_summary(run))
        return run
    except FedadError as error:
        exit_with(error)
        raise  # exit_with has raised SystemExit already
    except KeyboardInterrupt:
        print("fedad: interrupted; every Flower process of the run is stopped.", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
