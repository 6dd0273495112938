"""A Hydra command line checked before Hydra runs it: every job's config composed and validated."""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from fedad.config import compose, composition_error
from fedad.errors import FedadError, JobSkipped
from fedad.run.validate import validate

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override

# The one sweeper whose jobs can be listed in advance; others (Optuna) choose as they go.
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def check(argv: Sequence[str]) -> int:
    """Compose and validate the config of every job ``argv`` would run.

    A multirun's jobs are listed as Hydra's basic sweeper lists them (the
    command line's sweeps and the config's ``hydra.sweeper.params``), so a bad
    value in any job stops the sweep before its first job starts. Under
    another sweeper (Optuna), only the settings it does not search are known
    in advance, and those are checked. A multirun's job that only lies outside
    a robust strategy's bound (:class:`~fedad.errors.JobSkipped`) does not stop
    the sweep: it is skipped when its turn comes.

    Parameters
    ----------
    argv : Sequence[str]
        The command line after the program name, as Hydra reads it.

    Returns
    -------
    int
        The number of job configs checked (0 when ``argv`` runs no job, as
        ``--help`` or ``--cfg``).

    Raises
    ------
    FedadError
        One paragraph naming the job and the first bad setting.
    """
    args = _parse(argv)
    if args.help or args.hydra_help or args.info or args.cfg or args.shell_completion:
        return 0
    overrides = list(args.overrides)
    if args.config_dir:
        folder = Path(args.config_dir).expanduser().resolve()
        overrides.append(f"hydra.searchpath=[file://{folder}]")
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as error:
        raise composition_error(error, args.overrides) from None
    plain = [_line(o) for o in parsed if not o.is_sweep_override()]
    base = compose(plain, hydra=True, config_name=args.config_name)
    if not (args.multirun or base.hydra.mode == RunMode.MULTIRUN):
        validate(_job(base))
        return 1
    swept = {o.get_key_element(): o for o in parsed if o.is_sweep_override()}
    if base.hydra.sweeper.get("_target_") != BASIC_SWEEPER:
        validate(_job(base))
        return 1
    params = base.hydra.sweeper.get("params") or {}
    # A command-line value of a key the config sweeps replaces the config's values, as in
    # Hydra's basic sweeper.
    given = {*swept, *(o.get_key_element() for o in parsed if not o.is_sweep_override())}
    from_config = [f"{key}={value}" for key, value in params.items() if key not in given]
    swept.update(
        {o.get_key_element(): o for o in OverridesParser.create().parse_overrides(from_config)}
    )
    axes = [
        [f"{key}={value}" for value in o.sweep_string_iterator()]
        if o.is_sweep_override()
        else [_line(o)]
        for key, o in swept.items()
    ]
    jobs = list(itertools.product(*axes))
    for number, job in enumerate(jobs):
        try:
            validate(_job(compose([*plain, *job], hydra=True, config_name=args.config_name)))
        except JobSkipped:
            # The job will record itself as skipped, with the reason, and the sweep goes on.
            continue
        except FedadError as error:
            raise FedadError(
                f"Job {number} of the {len(jobs)} in this multirun ({' '.join(job)}): {error} "
                "No job was started."
            ) from None
    return len(jobs)


def _job(cfg: DictConfig) -> DictConfig:
    """The job's config without the ``hydra`` node, as the task function receives it."""
    # A config's mapping converts back to a mapping (OmegaConf types it as any node).
    job = cast(DictConfig, OmegaConf.create(OmegaConf.to_container(cfg, resolve=False)))
    with open_dict(job):
        job.pop("hydra", None)
    return job


def _line(override: Override) -> str:
    """An override as given (Hydra's parser sets it for every override it parses)."""
    return cast(str, override.input_line)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    """Hydra's own command-line flags, so the overrides are what remains."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--help", "-h", action="store_true")
    parser.add_argument("--hydra-help", action="store_true")
    parser.add_argument("--version", action="store_true")
    parser.add_argument("--cfg", "-c")
    parser.add_argument("--resolve", action="store_true")
    parser.add_argument("--package", "-p")
    parser.add_argument("--run", "-r", action="store_true")
    parser.add_argument("--multirun", "-m", action="store_true")
    parser.add_argument("--shell-completion", "-sc", action="store_true")
    parser.add_argument("--config-path", "-cp")
    parser.add_argument("--config-name", "-cn")
    parser.add_argument("--config-dir", "-cd")
    parser.add_argument("--experimental-rerun")
    parser.add_argument("--info", "-i", nargs="?", const="all")
    args, _ = parser.parse_known_args(list(argv))
    return args
