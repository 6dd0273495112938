"""What a detector's manifest, preprocessing and scaling must hold, checked before any is used."""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeGuard

import numpy as np

from fedad.data.preprocess import Preprocessor, preprocessor_from_dict
from fedad.detector.adapters import ADAPTERS, ANOMALY_SCORE, Predict, damaged
from fedad.errors import FedadError

# The tasks and label spellings a detector's labels can have (conf/config.yaml, conf/dataset).
TASKS = ("binary", "multiclass")
LABEL_CASES = ("exact", "insensitive")
FEATURE_TYPES = ("number", "category")
# How a pickle (protocol 2 on) and a zip archive (an .npz) start.
PICKLE_START, ZIP_START = b"\x80", b"PK\x03\x04"
# Rows the loaded model scores once, to show that it takes the schema's width.
PROBE_ROWS = 2

Check = tuple[Callable[[object], bool], str]


def _texts(value: object) -> TypeGuard[list[str]]:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _number(value: object) -> bool:
    # JSON true is no number, and a threshold or median must be finite to mean anything.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _one_of(*allowed: str) -> Check:
    return (lambda v: v in allowed, "one of " + ", ".join(f"'{a}'" for a in allowed))


TEXT: Check = (lambda v: isinstance(v, str) and v != "", "a non-empty text")
TEXTS: Check = (_texts, "a list of texts")
NAMES: Check = (lambda v: _texts(v) and len(set(v)) == len(v) > 0, "a list of distinct texts")
OPTIONAL_TEXT: Check = (lambda v: v is None or isinstance(v, str), "a text or null")
OBJECT: Check = (lambda v: isinstance(v, dict), "an object")
FLAG: Check = (lambda v: isinstance(v, bool), "true or false")
# The manifest entries that fedad reads, each with what it must hold; a key ending in "?"
# may be absent. Others (created, chosen_as, data.fingerprint...) are only shown.
SHAPE: tuple[tuple[str, Check], ...] = (
    ("model", OBJECT),
    ("model.name", TEXT),
    ("model.kind", _one_of(*ADAPTERS)),
    ("model.file", TEXT),
    # Detectors written before the autoencoder joined lack it: their kind says it.
    ("model.output?", TEXT),
    ("model.classes", (lambda v: isinstance(v, list) and v != [], "a list of class codes")),
    ("class_names", NAMES),
    ("reader", OBJECT),
    (
        "reader.sep",
        (lambda v: isinstance(v, str) and len(v) == 1 and v not in '"\r\n', "one character"),
    ),
    ("reader.header", FLAG),
    ("reader.columns", (lambda v: v is None or _texts(v), "a list of texts or null")),
    ("labels", OBJECT),
    ("labels.task", _one_of(*TASKS)),
    ("labels.label_column", TEXT),
    ("labels.normal_value", (lambda v: isinstance(v, str) or _number(v), "a text or a number")),
    ("labels.label_case?", _one_of(*LABEL_CASES)),
    ("labels.class_column?", OPTIONAL_TEXT),
    ("labels.class_map?", (lambda v: v is None or isinstance(v, dict), "an object or null")),
    ("schema", OBJECT),
    ("schema.features", (lambda v: isinstance(v, list) and v != [], "a list of columns")),
    ("schema.optional", TEXTS),
    ("schema.labels", TEXTS),
    ("schema.dropped", TEXTS),
    ("schema.encoded_features", NAMES),
    ("schema.log_transform", FLAG),
    ("scaling", OBJECT),
    ("scaling.rule", TEXT),
    ("decision", OBJECT),
    ("decision.default", TEXT),
    ("decision.rules", (lambda v: isinstance(v, dict) and v != {}, "an object of rules")),
    ("decision.note?", OPTIONAL_TEXT),
    ("decision.attack_score?", OPTIONAL_TEXT),
    ("test_metrics", OBJECT),
    ("data", OBJECT),
    ("data.test_file?", OPTIONAL_TEXT),
    ("data.data_dir?", OPTIONAL_TEXT),
    ("versions", (lambda v: isinstance(v, dict), "an object of library versions")),
    ("files", (lambda v: isinstance(v, dict), "an object of file checksums")),
)
_ABSENT = object()


def _at(manifest: dict, key: str) -> object:
    value: object = manifest
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _ABSENT
        value = value[part]
    return value


def _show(value: object) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def manifest_problems(manifest: dict) -> list[str]:
    """What is wrong with a manifest's entries; empty when fedad can use it.

    Parameters
    ----------
    manifest : dict
        ``detector.json``, already known to be an object of this format version.

    Returns
    -------
    list[str]
        One phrase per problem, naming the entry (``model.file``...).
    """
    problems = []
    for spec, (ok, what) in SHAPE:
        key = spec.rstrip("?")
        value = _at(manifest, key)
        if value is _ABSENT:
            if not spec.endswith("?"):
                problems.append(f"{key} is missing")
        elif not ok(value):
            problems.append(f"{key} must be {what}, not {_show(value)}")
    return problems


def consistency_problems(manifest: dict) -> list[str]:
    """What does not fit together in a manifest whose entries are each well typed.

    Parameters
    ----------
    manifest : dict
        ``detector.json``, with no :func:`manifest_problems`.

    Returns
    -------
    list[str]
        One phrase per problem, naming the entry.
    """
    model, names = manifest["model"], manifest["class_names"]
    adapter = ADAPTERS[model["kind"]]
    problems = []
    if model["file"] != adapter.file:
        problems.append(f"model.file of a {adapter.kind} model must be '{adapter.file}'")
    if model.get("output", adapter.output) != adapter.output:
        problems.append(f"model.output of a {adapter.kind} model must be '{adapter.output}'")
    classes = model["classes"]
    codes = all(type(c) is int and 0 <= c < len(names) for c in classes)
    if not codes or len(set(classes)) < len(classes):
        problems.append(
            f"model.classes must be distinct codes of class_names (0 to {len(names) - 1}), "
            f"not {_show(classes)}"
        )
    for i, feature in enumerate(manifest["schema"]["features"]):
        if not (
            isinstance(feature, dict)
            and isinstance(feature.get("name"), str)
            and feature.get("type") in FEATURE_TYPES
        ):
            problems.append(
                f"schema.features[{i}] must be {{'name': text, 'type': 'number' or "
                f"'category'}}, not {_show(feature)}"
            )
    rules, decision = manifest["decision"]["rules"], manifest["decision"]
    if decision["default"] not in rules:
        problems.append(f"decision.default '{decision['default']}' is none of decision.rules")
    anomaly = adapter.output == ANOMALY_SCORE
    for name, rule in rules.items():
        threshold = rule.get("threshold", _ABSENT) if isinstance(rule, dict) else _ABSENT
        if not (_number(threshold) or (threshold is None and not anomaly)):
            what = "a finite number" if anomaly else "a finite number or null"
            problems.append(f"decision.rules.{name}.threshold must be {what}")
    for name, version in manifest["versions"].items():
        if not (version is None or isinstance(version, str)):
            problems.append(f"versions.{name} must be a text or null, not {_show(version)}")
    return problems


def read_preprocessing(data: bytes, manifest: dict, path: Path) -> Preprocessor:
    """The preprocessing in ``data`` (``preprocessing.json``), once it fits the manifest's schema.

    Raises
    ------
    FedadError
        Naming ``path`` and what is wrong: no JSON, a missing or mistyped value,
        or columns or encoded features other than the schema's.
    """
    try:
        values = json.loads(data)
    except (ValueError, RecursionError) as err:
        raise damaged(path, "JSON", err) from None
    problems = _preprocessing_problems(values)
    if problems:
        raise damaged(path, "the detector's preprocessing", "; ".join(problems))
    pre = preprocessor_from_dict(values)
    schema = manifest["schema"]
    wanted = {t: [f["name"] for f in schema["features"] if f["type"] == t] for t in FEATURE_TYPES}
    if [pre.numeric, pre.categorical] != [wanted["number"], wanted["category"]]:
        raise FedadError(
            f"{path} does not encode the columns the manifest's schema.features lists: "
            f"{_difference(pre.numeric, wanted['number'], 'numeric')}; "
            f"{_difference(pre.categorical, wanted['category'], 'categorical')}. The files are "
            "of different detectors: copy the whole folder again, or write it again with "
            "python -m fedad.simulate."
        )
    if pre.log_transform != schema["log_transform"]:
        raise FedadError(
            f"{path} has log_transform {str(pre.log_transform).lower()}, but the manifest's "
            f"schema.log_transform is {str(schema['log_transform']).lower()}: the files are of "
            "different detectors. Copy the whole folder again, or write it again with python -m "
            "fedad.simulate."
        )
    if pre.feature_names != schema["encoded_features"]:
        raise FedadError(
            f"{path} encodes {len(pre.feature_names)} features, but the manifest's "
            f"schema.encoded_features lists {len(schema['encoded_features'])} (or others): the "
            "files are of different detectors. Copy the whole folder again, or write it again "
            "with python -m fedad.simulate."
        )
    return pre


def _difference(got: list[str], wanted: list[str], kind: str) -> str:
    """How ``got`` columns differ from the ``wanted`` ones, in a few words."""
    if got == wanted:
        return f"its {len(got)} {kind} columns are the same"
    extra = [c for c in got if c not in wanted][:5]
    lacking = [c for c in wanted if c not in got][:5]
    parts = [f"{len(got)} {kind} columns where the schema has {len(wanted)}"]
    parts += [f"not in the schema: {', '.join(extra)}"] if extra else []
    parts += [f"lacking: {', '.join(lacking)}"] if lacking else []
    return ", ".join(parts) if extra or lacking else parts[0] + " (in another order)"


def _preprocessing_problems(values: object) -> list[str]:
    if not isinstance(values, dict):
        return ["it holds no JSON object"]
    problems = [
        f"{key} must be {what}"
        for key, ok, what in (
            ("numeric", _texts, "a list of texts"),
            ("categorical", _texts, "a list of texts"),
            ("log_transform", lambda v: isinstance(v, bool), "true or false"),
            ("medians", lambda v: isinstance(v, list) and all(map(_number, v)), "numbers"),
            ("categories", lambda v: isinstance(v, dict), "an object"),
            ("infrequent", lambda v: isinstance(v, dict), "an object"),
        )
        if not ok(values.get(key))
    ]
    if problems:
        return problems
    if len(values["medians"]) != len(values["numeric"]):
        problems.append("medians must hold one number per numeric column")
    for col in values["categorical"]:
        cats, rare = values["categories"].get(col), values["infrequent"].get(col, _ABSENT)
        if not (_texts(cats) and len(set(cats)) == len(cats)):
            problems.append(f"categories.{col} must be a list of distinct texts")
        elif not (rare is None or (_texts(rare) and set(rare) <= set(cats))):
            problems.append(f"infrequent.{col} must be null or some of categories.{col}")
    return problems


def read_scaling(data: bytes, manifest: dict, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The ``mean`` and ``std`` in ``data`` (``scaling.npz``), never unpickling anything.

    Raises
    ------
    FedadError
        Naming ``path``: pickled content, no ``.npz`` of ``mean`` and ``std``,
        or arrays that are not one finite float per encoded feature (``std > 0``).
    """
    width = len(manifest["schema"]["encoded_features"])
    what = "an .npz archive of mean and std"
    if data[:1] == PICKLE_START:
        raise _pickled(path)
    if not data.startswith(ZIP_START):
        raise damaged(path, what, "it does not start as a zip archive does")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as stats:
            arrays = [np.asarray(stats[key]) for key in ("mean", "std")]
    except ValueError as err:
        # numpy's refusal of an object array, which only unpickling could load.
        if "pickle" in str(err):
            raise _pickled(path) from None
        raise damaged(path, what, err) from None
    except (KeyError, OSError, EOFError, MemoryError, zipfile.BadZipFile) as err:
        raise damaged(path, what, err) from None
    for key, array in zip(("mean", "std"), arrays, strict=True):
        if array.dtype.kind != "f" or array.shape != (width,) or not np.isfinite(array).all():
            raise damaged(
                path,
                "the detector's standardization",
                f"{key} must be {width} finite floats, one per encoded feature; it holds "
                f"{array.dtype} of shape {array.shape}",
            )
    mean, std = (a.astype(np.float64) for a in arrays)
    if (std <= 0).any():
        raise damaged(path, "the detector's standardization", "std holds a value <= 0")
    return mean, std


def _pickled(path: Path) -> FedadError:
    return FedadError(
        f"{path} is not loaded: it holds pickled Python objects, and unpickling runs code "
        "stored in the file. fedad never writes pickles into a detector (its scaling.npz holds "
        "two float arrays); use a detector that fedad.simulate wrote."
    )


def check_model(predict: Predict, X: np.ndarray, manifest: dict, path: Path) -> None:
    """Refuse a model that cannot score the schema's standardized rows ``X`` as the manifest says.

    A probabilities model must give one value per ``model.classes`` entry, an
    anomaly model one score per row, all finite: a model of another detector,
    or one damaged without its file failing to load, ends here.
    """
    anomaly = ADAPTERS[manifest["model"]["kind"]].output == ANOMALY_SCORE
    shape = (len(X),) if anomaly else (len(X), len(manifest["model"]["classes"]))
    # The model's library raises many types for rows it cannot take; each ends here.
    try:
        out = np.asarray(predict(X), dtype=np.float64)
    except Exception as err:
        raise damaged(
            path, f"a model that takes the schema's {X.shape[1]} encoded features", err
        ) from None
    if out.shape != shape or not np.isfinite(out).all():
        raise damaged(
            path,
            "the model the manifest describes",
            f"on {len(X)} rows of the schema's {X.shape[1]} encoded features it gives an "
            f"output of shape {out.shape} ({'finite' if np.isfinite(out).all() else 'not finite'})"
            f", where {shape} finite values are expected",
        )
