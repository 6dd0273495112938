"""A detector folder on disk: written whole or not at all, checked before anything is loaded."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from fedad import __version__, rundir
from fedad.data.preprocess import Preprocessor, preprocessor_to_dict
from fedad.detector.adapters import adapter_for
from fedad.detector.contents import consistency_problems, manifest_problems
from fedad.errors import FedadError
from fedad.versions import versions

log = logging.getLogger("fedad")

# Bumped whenever a reader of the old layout would misread the new one.
FORMAT_VERSION = 1
# Libraries every detector needs (reading, preprocessing); each model kind adds its own.
COMMON_LIBRARIES = ("numpy", "pandas", "scikit-learn")
# A manifest larger than this is none fedad wrote (they hold a few kB).
MANIFEST_BYTES = 16 << 20
# The files every detector loads besides its model (``model.file``).
LOADED = (rundir.DETECTOR_PREPROCESSING, rundir.DETECTOR_SCALING)


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
        files = sorted([adapter.file, *LOADED])
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
            "files": {name: _checksum((tmp / name).read_bytes()) for name in files},
        }
        rundir.write_json(tmp / rundir.DETECTOR_MANIFEST, full)
    log.info("detector for %s written to %s", manifest["model"]["name"], folder)
    return folder


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a detector folder, once the folder is known to be complete and unaltered.

    Refuses (FedadError, one paragraph) a path that is no detector folder, a
    manifest that is no JSON object, of another format version, or with an
    entry missing or mistyped; a file name that is not a plain name inside the
    folder (``..``, an absolute path, a link leading out of it); a file it
    loads that has no checksum entry; and a missing or altered file. Logs a
    warning for each library whose installed version differs from the one that
    wrote it.

    Parameters
    ----------
    folder : str or Path
        A ``detector/<model>`` folder of a run.

    Returns
    -------
    dict
    """
    folder = Path(folder)
    if not (folder / rundir.DETECTOR_MANIFEST).is_file():
        raise FedadError(f"{folder} is not a detector folder: {_what_is_there(folder)}")
    path = inside(folder, rundir.DETECTOR_MANIFEST, "its own name")
    try:
        raw = _read(path, MANIFEST_BYTES)
        if len(raw) > MANIFEST_BYTES:
            raise ValueError(f"it is larger than {MANIFEST_BYTES} bytes")
        manifest = json.loads(raw)
    except (OSError, ValueError, RecursionError) as err:
        raise FedadError(
            f"{path} cannot be read as JSON ({' '.join(str(err).split())[:200]}); the detector "
            "folder is damaged. Write it again with python -m fedad.simulate."
        ) from None
    if not isinstance(manifest, dict):
        raise FedadError(
            f"{path} holds no JSON object, so it is no detector manifest; the detector folder "
            "is damaged. Write it again with python -m fedad.simulate."
        )
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or type(version) is not int:
        recorded = manifest.get("versions")
        writer = recorded.get("fedad") if isinstance(recorded, dict) else None
        writer = writer if isinstance(writer, str) and version else "unknown"
        raise FedadError(
            f"{folder} holds a detector in format version {repr(version)[:40]} (written by fedad "
            f"{writer}), but this fedad {__version__} reads format version {FORMAT_VERSION} "
            f"only. Score it with fedad {writer}, or write the detector again with this "
            "fedad's python -m fedad.simulate."
        )
    _refuse(path, manifest_problems(manifest))
    inside(folder, manifest["model"]["file"], "model.file")
    for name in manifest["files"]:
        inside(folder, name, f"files.{name}")
    _refuse(path, consistency_problems(manifest))
    loaded = [manifest["model"]["file"], *LOADED]
    for name in loaded:
        if name not in manifest["files"]:
            raise FedadError(
                f"{path} has no checksum for {name} (under files), so fedad does not load it: "
                "every file a detector loads must be covered by its manifest. The folder is "
                "damaged or was not written by fedad; write it again with python -m "
                "fedad.simulate."
            )
    for name in manifest["files"]:
        read_file(folder, manifest, name)
    _warn_versions(manifest["versions"], folder)
    return manifest


def _refuse(path: Path, problems: list[str]) -> None:
    if problems:
        raise FedadError(
            f"{path} does not describe a detector this fedad can load: {'; '.join(problems)}. "
            "The folder is damaged or was not written by fedad; write it again with python -m "
            "fedad.simulate."
        )


def inside(folder: Path, name: object, entry: str) -> Path:
    """``folder / name``, once ``name`` is known to be a plain file name whose file stays inside.

    Parameters
    ----------
    folder : Path
        The detector folder.
    name : object
        A file name the manifest gives.
    entry : str
        The manifest entry that gives it, for the message.

    Raises
    ------
    FedadError
        When ``name`` is no plain file name (a folder part, ``..``, an absolute
        path), or a link makes it lead out of ``folder``.
    """
    plain = isinstance(name, str) and name not in ("", ".", "..")
    if not plain or any(c in str(name) for c in "/\\\0:"):
        raise FedadError(
            f"The manifest of {folder} names {json.dumps(name)[:80]} as {entry}, which is not a "
            "plain file name inside the detector folder (no folders, '..' or absolute paths), "
            "so fedad reads nothing from it. The folder is damaged or was not written by fedad."
        )
    path = folder / str(name)
    real = path.resolve()
    if not real.is_relative_to(folder.resolve()):
        raise FedadError(
            f"{path} ({entry} of the manifest) is a link to {real}, outside the detector "
            "folder, so fedad reads nothing from it. Copy the file itself into the folder."
        )
    return path


def read_file(folder: Path, manifest: dict, name: str) -> bytes:
    """The content of the file ``name`` of a checked manifest, once it matches its checksum.

    The bytes returned are the ones that were checked, so a file changed after
    :func:`read_manifest` is refused rather than loaded.

    Raises
    ------
    FedadError
        When the file is missing, not a regular file, or differs from the checksum.
    """
    path = inside(folder, name, f"files.{name}")
    expected = manifest["files"].get(name)
    if not isinstance(expected, dict) or set(expected) != {"sha256", "bytes"}:
        raise FedadError(
            f"The manifest of {folder} gives files.{name} as {json.dumps(expected)[:80]}, not "
            '{"sha256": ..., "bytes": ...}; the folder is damaged. Write it again with '
            "python -m fedad.simulate."
        )
    # A regular file only: a pipe or a device would hang or never end.
    if not path.resolve().is_file():
        raise FedadError(
            f"{folder} is incomplete: {name} is missing or is no regular file (the detector "
            f"needs {', '.join(manifest['files'])}). Copy the whole folder, or write it again "
            "with python -m fedad.simulate."
        )
    size = expected["bytes"]
    data = _read(path, size if type(size) is int and size >= 0 else None)
    if _checksum(data) != expected:
        raise FedadError(
            f"{path} is not the file the detector was written with (its size or checksum "
            "differs): it was changed or damaged. Copy the whole folder again, or write it "
            "again with python -m fedad.simulate."
        )
    return data


def _read(path: Path, size: int | None) -> bytes:
    """The file's bytes; past ``size``, one more byte only (enough to see that it differs)."""
    with open(path.resolve(), "rb") as f:
        return f.read(-1 if size is None else size + 1)


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


def _checksum(data: bytes) -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


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
