"""Composing the run config with Hydra, and its errors as one paragraph naming the key."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedad.config import (
    resolvers,  # noqa: F401  (registers ${attackers:}, which conf/ uses)
    schema,  # noqa: F401  (stores the schema conf/config.yaml names)
)
from fedad.errors import FedadError


def _conf_dir() -> Path:
    """The config tree: inside the package when installed from a wheel, else the checkout's."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    return package / "conf"


CONF_DIR = _conf_dir()
CONFIG_NAME = "config"


def compose(
    overrides: Sequence[str] = (), *, hydra: bool = False, config_name: str | None = None
) -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra ``overrides``, as ``python -m fedad.simulate`` does.

    Parameters
    ----------
    overrides : Sequence[str]
        ``key=value``, ``group=option``, ``+key=value`` ...
    hydra : bool
        Keep the ``hydra`` node (the run and sweep folders, the sweeper).
    config_name : str, optional
        Another primary config than ``config`` (one added with ``--config-dir``).

    Returns
    -------
    DictConfig

    Raises
    ------
    FedadError
        One paragraph naming the key: an unknown key or option, a value of the
        wrong type for the schema, a malformed override.
    """
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(
                config_name or CONFIG_NAME, overrides=list(overrides), return_hydra_config=hydra
            )
    except (HydraException, OmegaConfBaseException) as error:
        raise composition_error(error, overrides) from None


def composition_error(error: BaseException, overrides: Sequence[str] = ()) -> FedadError:
    """Turn a Hydra or OmegaConf composition error into one paragraph naming the key.

    Parameters
    ----------
    error : BaseException
        What Hydra raised while composing (its cause chain is searched).
    overrides : Sequence[str]
        The command line's overrides, quoted in the message when no key is known.

    Returns
    -------
    FedadError
    """
    chain: list[BaseException] = []
    link: BaseException | None = error
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__ or link.__context__
    texts = [" ".join(str(e).split()) for e in chain]
    full_key = next((m.group(1) for t in texts if (m := re.search(r"full_key: (\S+)", t))), None)
    conversion = next(
        (
            m
            for t in texts
            if (
                m := re.search(
                    r"Value '(.*?)' of type '\w+' could not be "
                    r"converted to (\w+)",
                    t,
                )
            )
        ),
        None,
    )
    if full_key and conversion:
        expected = {"Integer": "a whole number", "Float": "a number", "Boolean": "true or false"}
        wanted = expected.get(conversion.group(2), conversion.group(2))
        return FedadError(
            f"{full_key} must be {wanted}, got '{conversion.group(1)}'. Fix it on the command "
            f"line ({full_key}=...) or in the config file that sets it."
        )
    missing = next((m for t in texts if (m := re.search(r"Key '(\S+?)' (?:is )?not in", t))), None)
    if missing:
        key = full_key or missing.group(1)
        return FedadError(f"Unknown setting {key}: {_no_such_key(key)}")
    option = next(
        (m for t in texts if (m := re.search(r"Could not find '(\S+?)/(\S+?)'", t))), None
    )
    if option:
        group, name = option.group(1), option.group(2)
        choices = available_options(group)
        hint = _closest(name, choices)
        return FedadError(
            f"Unknown {group} option '{name}'.{hint} Available: {', '.join(choices) or 'none'} "
            f"(files in conf/{group}/, or in a folder added with --config-dir)."
        )
    return FedadError(
        f"Cannot compose the configuration from {list(overrides)}: {texts[0]} Check the "
        "spelling of each key=value override; keys are listed in conf/config.yaml."
    )


def _no_such_key(key: str) -> str:
    """What to say about a key the composed config does not have."""
    parent, _, leaf = key.rpartition(".")
    try:
        node = compose()
        known = OmegaConf.select(node, parent) if parent else node
    except FedadError:
        known = None
    names = list(known.keys()) if isinstance(known, DictConfig) else []
    where = parent or "the config root"
    hint = _closest(leaf, [str(n) for n in names])
    return (
        f"{where} has no key '{leaf}'.{hint} Known keys there: {', '.join(map(str, names))}. "
        "A key that an option group adds only for some options (strategy.proximal_mu with "
        "strategy=fedprox) needs that option; a new key needs a leading '+'."
    )


def _closest(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def available_options(group: str) -> list[str]:
    """The options of a config group: ``conf/<group>/*.yaml`` without the extension."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def load_option(group: str, name: str) -> DictConfig:
    """Read one option file of a config group, e.g. ``load_option("model", "cnn")``."""
    # An option file is a mapping of settings (OmegaConf.load is typed for a list too).
    return cast(DictConfig, OmegaConf.load(CONF_DIR / group / f"{name}.yaml"))
