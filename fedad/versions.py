"""The versions of Python, fedad and every library that changes a run's numbers."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

from fedad import __version__

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


def versions() -> dict[str, str | None]:
    """Python's, fedad's and each library's version, None for a library not installed.

    Returns
    -------
    dict[str, str or None]
        ``{"fedad": ..., "python": ..., "tensorflow": ..., ...}``, the keys of
        :data:`LIBRARIES` after ``fedad`` and ``python``.
    """
    found: dict[str, str | None] = {"fedad": __version__, "python": platform.python_version()}
    for name, distributions in LIBRARIES.items():
        found[name] = next(
            (v for v in map(_installed, distributions) if v is not None),
            None,
        )
    return found


def _installed(distribution: str) -> str | None:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None
