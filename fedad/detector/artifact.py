"""A detector folder on disk: written whole or not at all, checked before anything is loaded."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from fedad import __version__, rundir
from fedad.data.preprocess import Preprocessor, preprocessor_to_dict
from fedad.detector.adapters import ADAPTERS, adapter_for
from fedad.errors import FedadError
from fedad.versions import versions

log = logging.getLogger("fedad")

# Bumped whenever a reader of the old layout would misread the new one.
FORMAT_VERSION = 1
# Libraries every detector needs (reading, preprocessing); each model kind adds its own.
COMMON_LIBRARIES = ("numpy", "pandas", "scikit-learn")


def write(
    folder: Path,
    manifest: dict,
    model: object,
    preprocessor: Preprocessor,
    mean: np.ndarray,
    std: np.ndarray,
) -> Path:
    """Write a complete detector folder, replacing any earlier one only once it is complete.

    Parameters
    ----------
    folder : Path
        The detector folder to create (``<run>/detector/<model>``).
    manifest : dict
        What :mod:`fedad.detector.build` gathered (reader, labels, schema,
        decision, data, metrics...); the format version, model file, library
        versions and file checksums are added here.
    model : object
        The fitted model, or the path of a ``.keras`` file.
    preprocessor : Preprocessor
        Fitted on the training rows.
    mean, std : np.ndarray
        The standardization the model's inputs need.

    Returns
    -------
    Path
        ``folder``.
    """
    adapter = adapter_for(model)
    with rundir.atomic_folder(folder) as tmp:
        adapter.save(model, tmp / adapter.file)
        rundir.write_json(tmp / rundir.DETECTOR_PREPROCESSING, preprocessor_to_dict(preprocessor))
        with rundir.atomic(tmp / rundir.DETECTOR_SCALING) as f:
            np.savez(f, mean=np.asarray(mean, np.float64), std=np.asarray(std, np.float64))
        files = sorted([adapter.file, rundir.DETECTOR_PREPROCESSING, rundir.DETECTOR_SCALING])
        full = {
            "format_version": FORMAT_VERSION,
            **manifest,
            "model": {
                **manifest["model"],
                "kind": adapter.kind,
                "file": adapter.file,
                "output": adapter.output,
            },
            "versions": versions((*COMMON_LIBRARIES, *adapter.libraries)),
            "files": {name: _checksum(tmp / name) for name in files},
        }
        rundir.write_json(tmp / rundir.DETECTOR_MANIFEST, full)
    log.info("detector for %s written to %s", manifest["model"]["name"], folder)
    return folder


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a detector folder, once the folder is known to be complete and readable.

    Refuses (FedadError) a path that is no detector folder, a manifest of
    another format version, and a missing or altered file; logs a warning
    for each library whose installed version differs from the one that wrote it.

    Parameters
    ----------
    folder : str or Path
        A ``detector/<model>`` folder of a run.

    Returns
    -------
    dict
    """
    folder = Path(folder)
    path = folder / rundir.DETECTOR_MANIFEST
    if not path.is_file():
        raise FedadError(f"{folder} is not a detector folder: {_what_is_there(folder)}")
    try:
        manifest = rundir.read_json(path)
    except (OSError, ValueError) as err:
        raise FedadError(
            f"{path} cannot be read as JSON ({err}); the detector folder is damaged. Write it "
            "again with python -m fedad.simulate."
        ) from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        writer = manifest.get("versions", {}).get("fedad", "unknown") if version else "unknown"
        raise FedadError(
            f"{folder} holds a detector in format version {version!r} (written by fedad "
            f"{writer}), but this fedad {__version__} reads format version {FORMAT_VERSION} "
            f"only. Score it with fedad {writer}, or write the detector again with this "
            "fedad's python -m fedad.simulate."
        )
    if manifest["model"]["kind"] not in ADAPTERS:
        raise FedadError(
            f"{folder} holds a model of kind '{manifest['model']['kind']}', which this fedad "
            f"cannot load (it loads: {', '.join(ADAPTERS)})."
        )
    for name, expected in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            raise FedadError(
                f"{folder} is incomplete: {name} is missing (the detector needs "
                f"{', '.join(manifest['files'])}). Copy the whole folder, or write it again "
                "with python -m fedad.simulate."
            )
        if _checksum(file) != expected:
            raise FedadError(
                f"{file} is not the file the detector was written with (its size or checksum "
                "differs): it was changed or damaged. Copy the whole folder again, or write it "
                "again with python -m fedad.simulate."
            )
    _warn_versions(manifest["versions"], folder)
    return manifest


def _warn_versions(recorded: dict, folder: Path) -> None:
    found = versions(k for k in recorded if k not in ("fedad", "python"))
    # Not installed: None, or "absent" in detectors written before fedad.versions.
    installed = {name: found.get(name) or "absent" for name in recorded}
    changed = [
        f"{name} {was or 'absent'} -> {installed[name]}"
        for name, was in recorded.items()
        if name != "python" and installed[name] != (was or "absent")
    ]
    if changed:
        log.warning(
            "the detector in %s was written with other library versions (%s); its scores may "
            "differ slightly from the ones it recorded.",
            folder,
            ", ".join(changed),
        )


def _checksum(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}


def _what_is_there(folder: Path) -> str:
    if not folder.exists():
        return "there is no such file or folder."
    if not folder.is_dir():
        return "it is a file; give the detector folder (detector/<model> in a run folder)."
    # A run folder, or its detector/ folder: name the detectors inside.
    for pattern in (f"*/{rundir.DETECTOR_MANIFEST}", f"*/*/{rundir.DETECTOR_MANIFEST}"):
        inside = sorted(str(p.parent) for p in folder.glob(pattern))
        if inside:
            return f"it holds detectors in {', '.join(inside)}; give one of them."
    return (
        f"it has no {rundir.DETECTOR_MANIFEST}, so it is not a detector or was not written "
        "completely. A run writes its detectors into detector/<model> of the run folder."
    )
