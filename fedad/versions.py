"""The versions of Python, fedad and every library that changes a run's numbers."""

from __future__ import annotations

import platform
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version


def _own_version() -> str:
    """The version of fedad installed: its metadata, from pyproject.toml, the one source."""
    try:
        return version("fedad")
    except PackageNotFoundError:  # a checkout put on sys.path without installing it
        return "0+unknown"


__version__ = _own_version()
# Distribution names by the name results.json records; the first one installed wins
# (TensorFlow installs as tensorflow-cpu on x86-64 Linux, as tensorflow elsewhere).
LIBRARIES: dict[str, tuple[str, ...]] = {
    "tensorflow": ("tensorflow", "tensorflow-cpu"),
    "keras": ("keras",),
    "xgboost": ("xgboost", "xgboost-cpu"),
    "numpy": ("numpy",),
    "scipy": ("scipy",),
    "pandas": ("pandas",),
    "scikit-learn": ("scikit-learn",),
    "ray": ("ray",),
    "flwr": ("flwr",),
    "flwr-datasets": ("flwr-datasets",),
    "shap": ("shap",),
}


def versions(names: Iterable[str] | None = None) -> dict[str, str | None]:
    """Python's, fedad's and each library's version, None for a library not installed.

    Parameters
    ----------
    names : Iterable[str], optional
        Libraries to look up, by the names of :data:`LIBRARIES` or any
        distribution name (``skops``; its ``-cpu`` build counts too). Default:
        every library of :data:`LIBRARIES`.

    Returns
    -------
    dict[str, str or None]
        ``{"fedad": ..., "python": ..., "tensorflow": ..., ...}``.
    """
    found: dict[str, str | None] = {"fedad": __version__, "python": platform.python_version()}
    for name in LIBRARIES if names is None else names:
        distributions = LIBRARIES.get(name, (name, f"{name}-cpu"))
        found[name] = next((v for v in map(_installed, distributions) if v is not None), None)
    return found


def _installed(distribution: str) -> str | None:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None
