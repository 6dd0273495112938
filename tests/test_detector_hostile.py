"""Detector folders as untrusted input: hostile or damaged ones end in one refusal, no code runs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from detector_helpers import OVERRIDES, raw_rows

from fedad import rundir, score
from fedad.baselines.runner import run_baselines
from fedad.config import compose
from fedad.detector import Detector
from fedad.detector.adapters import TRUST_ENV
from fedad.detector.build import write_detector
from fedad.errors import FedadError
from fedad.federated.checkpoint import data_fingerprint
from fedad.run.pipeline import prepare_run

MODELS = {
    "logistic_regression": {"C": 1.0, "max_iter": 1000, "class_weight": "balanced"},
    "xgboost": {"n_estimators": 10, "max_depth": 3, "learning_rate": 0.1},
    "central_logistic": {"model": "logistic"},
}
SKLEARN, XGBOOST, KERAS = MODELS
KERAS_MODELS = {"logistic": {"name": "logistic"}}
# Generated folders per run of the fuzz test, and its seed.
CASES, SEED = 120, 20261207


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One small run's detectors (scikit-learn, XGBoost, Keras), with their scores of raw rows."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose(OVERRIDES)
    run = prepare_run(cfg, run_dir)
    # No validation refit: these detectors are attacked, not chosen.
    results = run_baselines(
        {"models": MODELS}, run.data, cfg.train, keras_epochs=1, seed=0, model_cfgs=KERAS_MODELS
    )
    fingerprint = data_fingerprint(run.data, run.parts)
    for result in results:
        write_detector(cfg, run.data, fingerprint, result, run_dir)
    folders = {name: run_dir / rundir.DETECTOR_DIR / name for name in MODELS}
    rows = raw_rows(30)
    scores = {name: Detector.load(folder).score(rows).scores for name, folder in folders.items()}
    source = run_dir / "rows.csv"
    rows.to_csv(source, index=False)
    return folders, source, rows, scores


# --- building hostile folders -------------------------------------------------------------------


def _copy(built, name: str, tmp_path: Path) -> Path:
    folder = tmp_path / "detector"
    shutil.copytree(built[0][name], folder)
    return folder


def _manifest(folder: Path) -> dict:
    return json.loads((folder / rundir.DETECTOR_MANIFEST).read_text())


def _write_manifest(folder: Path, manifest: dict) -> None:
    (folder / rundir.DETECTOR_MANIFEST).write_text(json.dumps(manifest))


def _sum(data: bytes) -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _reseal(folder: Path) -> None:
    """Give every listed file that is there its checksum: what an attacker who edits files does."""
    manifest = _manifest(folder)
    files = manifest.get("files")
    if isinstance(files, dict):
        for name in files:
            path = folder / str(name)
            if path.is_file():
                files[name] = _sum(path.read_bytes())
        _write_manifest(folder, manifest)


def _replace(folder: Path, name: str, data: bytes) -> None:
    (folder / name).unlink(missing_ok=True)
    (folder / name).write_bytes(data)
    _reseal(folder)


class _Payload:
    """Unpickled, it creates its canary file: proof that code from the folder ran."""

    def __init__(self, canary: Path) -> None:
        self.canary = str(canary)

    def __reduce__(self):
        return open, (self.canary, "w")


def _pickled(canary: Path, rng: np.random.Generator) -> bytes:
    """A pickle payload: a raw pickle, or an .npz archive whose array is pickled objects."""
    if rng.random() < 0.5:
        return pickle.dumps(_Payload(canary), protocol=int(rng.integers(2, 6)))
    buffer = io.BytesIO()
    payload = np.array([_Payload(canary)], dtype=object)
    np.savez(buffer, mean=payload, std=payload)
    return buffer.getvalue()


def _lambda_model(folder: Path, canary: Path) -> bytes:
    """The folder's Keras model behind a Lambda layer whose code creates the canary."""
    import keras

    model = keras.models.load_model(folder / rundir.DETECTOR_KERAS, compile=False)
    inputs = keras.Input(shape=model.input_shape[1:])
    touch = eval(f"lambda x: (__import__('pathlib').Path({str(canary)!r}).touch(), x)[1]")
    evil = keras.Model(inputs, model(keras.layers.Lambda(touch)(inputs)))
    path = folder.parent / "evil.keras"
    evil.save(path)
    canary.unlink()  # building the model ran the layer once, as loading it would
    return path.read_bytes()


def _keras_naming(folder: Path, module: str) -> bytes:
    """The folder's Keras model, its config naming ``module`` for its first layer."""
    with zipfile.ZipFile(folder / rundir.DETECTOR_KERAS) as archive:
        parts = {n: archive.read(n) for n in archive.namelist()}
    config = json.loads(parts["config.json"])
    config["config"]["layers"][-1]["module"] = module
    parts["config.json"] = json.dumps(config).encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in parts.items():
            archive.writestr(name, data)
    return out.getvalue()


# --- what each refusal must be ------------------------------------------------------------------


def _refused(folder: Path, **load) -> str:
    """Loading fails with one fedad paragraph that names the folder; the paragraph."""
    with pytest.raises(FedadError) as refusal:
        Detector.load(folder, **load)
    message = str(refusal.value)
    assert str(folder) in message and "\n" not in message and "Traceback" not in message
    return message


def _cli_refused(capsys, folder: Path, source: Path) -> str:
    with pytest.raises(SystemExit) as exit_info:
        score.main([str(folder), str(source)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fedad: error: ") and "Traceback" not in err
    return " ".join(err.split())


@pytest.mark.parametrize(
    "form",
    ["../outside/{name}", "{outside}/{name}", "sub/../{name}", "./{name}", "..", "/{name}"],
)
@pytest.mark.parametrize("entry", ["model.file", "files"])
def test_a_name_leading_out_of_the_folder_is_refused_naming_its_entry(built, tmp_path, form, entry):
    folder = _copy(built, SKLEARN, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    model = folder / rundir.DETECTOR_SKOPS
    shutil.copy(model, outside / model.name)
    name = form.format(name=model.name, outside=outside)
    manifest = _manifest(folder)
    # The outside file has the right checksum: only its place betrays it.
    manifest["files"][name] = _sum(model.read_bytes())
    if entry == "model.file":
        manifest["model"]["file"] = name
    _write_manifest(folder, manifest)
    message = _refused(folder)
    assert "not a plain file name inside the detector folder" in message
    assert (f"as {entry}" if entry == "model.file" else f"as files.{name}") in message


def test_a_link_out_of_the_folder_is_refused_though_its_checksum_matches(built, tmp_path):
    folder = _copy(built, SKLEARN, tmp_path)
    outside = tmp_path / "elsewhere.skops"
    shutil.move(folder / rundir.DETECTOR_SKOPS, outside)
    (folder / rundir.DETECTOR_SKOPS).symlink_to(outside)
    message = _refused(folder)
    assert f"is a link to {outside}, outside the detector folder" in message


def test_a_link_inside_the_folder_loads_and_scores_the_same(built, tmp_path):
    folder = _copy(built, SKLEARN, tmp_path)
    shutil.move(folder / rundir.DETECTOR_SKOPS, folder / "kept.skops")
    (folder / rundir.DETECTOR_SKOPS).symlink_to("kept.skops")
    _, _, rows, scores = built
    np.testing.assert_array_equal(Detector.load(folder).score(rows).scores, scores[SKLEARN])


@pytest.mark.parametrize("name", [rundir.DETECTOR_SKOPS, rundir.DETECTOR_SCALING])
def test_a_file_the_detector_loads_without_a_checksum_is_refused(built, tmp_path, name):
    folder = _copy(built, SKLEARN, tmp_path)
    manifest = _manifest(folder)
    del manifest["files"][name]
    _write_manifest(folder, manifest)
    assert f"has no checksum for {name}" in _refused(folder)


def test_a_lambda_layer_is_refused_and_runs_only_with_the_opt_in(
    built, tmp_path, capsys, monkeypatch
):
    folder = _copy(built, KERAS, tmp_path)
    canary = tmp_path / "canary"
    _replace(folder, rundir.DETECTOR_KERAS, _lambda_model(folder, canary))
    monkeypatch.delenv(TRUST_ENV, raising=False)
    message = _refused(folder)
    assert "Lambda layer" in message and "trust_custom_code=True" in message
    assert "Lambda layer" in _cli_refused(capsys, folder, built[1])
    assert not canary.exists()
    monkeypatch.setenv(TRUST_ENV, "yes")
    assert f"{TRUST_ENV} is 'yes'" in str(pytest.raises(FedadError, Detector.load, folder).value)
    # The user's own layer, trusted: it loads (its code runs) and scores as the model inside.
    monkeypatch.setenv(TRUST_ENV, "1")
    _, _, rows, scores = built
    np.testing.assert_allclose(Detector.load(folder).score(rows).scores, scores[KERAS], atol=1e-6)
    assert canary.exists()
    canary.unlink()
    assert _refused(folder, trust_custom_code=False) and not canary.exists()


def test_a_keras_config_naming_code_outside_keras_is_refused_before_keras_reads_it(
    built, tmp_path, monkeypatch
):
    folder = _copy(built, KERAS, tmp_path)
    canary = tmp_path / "canary"
    # A module that would create the canary when imported, where Python finds it.
    (tmp_path / "evil_layers.py").write_text(f"open({str(canary)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _replace(folder, rundir.DETECTOR_KERAS, _keras_naming(folder, "evil_layers"))
    message = _refused(folder)
    assert "names Python code outside Keras (evil_layers)" in message
    assert not canary.exists()


@pytest.mark.parametrize("target", [rundir.DETECTOR_SCALING, rundir.DETECTOR_SKOPS])
@pytest.mark.parametrize("seed", [0, 1])
def test_a_pickle_payload_is_refused_and_never_runs(built, tmp_path, target, seed):
    canary = tmp_path / "canary"
    payload = _pickled(canary, np.random.default_rng(seed))
    folder = _copy(built, SKLEARN, tmp_path)
    _replace(folder, target, payload)
    message = _refused(folder)
    assert target in message
    if target == rundir.DETECTOR_SCALING:
        assert "pickled Python objects" in message
    assert not canary.exists()
    # The payload is live: unpickled, it would have run.
    live = tmp_path / "live"
    blob = _pickled(live, np.random.default_rng(seed))
    if blob.startswith(b"PK"):
        np.load(io.BytesIO(blob), allow_pickle=True)["mean"]
    else:
        pickle.loads(blob)
    assert live.exists()


def test_a_skops_file_holding_functions_is_refused(built, tmp_path):
    import skops.io
    from sklearn.preprocessing import FunctionTransformer

    folder = _copy(built, SKLEARN, tmp_path)
    path = tmp_path / "evil.skops"
    skops.io.dump(FunctionTransformer(func=os.system), path)
    _replace(folder, rundir.DETECTOR_SKOPS, path.read_bytes())
    assert "holds types fedad never saves in a detector" in _refused(folder)


def _truncate_model(folder: Path) -> None:
    data = (folder / rundir.DETECTOR_SKOPS).read_bytes()
    _replace(folder, rundir.DETECTOR_SKOPS, data[: len(data) // 2])


def _drop_key(folder: Path) -> None:
    manifest = _manifest(folder)
    del manifest["decision"]["default"]
    manifest["model"]["classes"] = "0,1"
    _write_manifest(folder, manifest)


def _narrow_preprocessing(folder: Path) -> None:
    values = json.loads((folder / rundir.DETECTOR_PREPROCESSING).read_text())
    values["numeric"], values["medians"] = values["numeric"][1:], values["medians"][1:]
    _replace(folder, rundir.DETECTOR_PREPROCESSING, json.dumps(values).encode())


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_truncate_model, "cannot be read as a scikit-learn model (skops)"),
        (_drop_key, 'model.classes must be a list of class codes, not "0,1"; decision.default is'),
        (_narrow_preprocessing, "does not encode the columns the manifest's schema.features"),
        (
            lambda f: (f / rundir.DETECTOR_MANIFEST).write_text("{'model':"),
            "cannot be read as JSON",
        ),
        (lambda f: (f / rundir.DETECTOR_SCALING).unlink(), "scaling.npz is missing"),
    ],
    ids=["truncated model resealed", "manifest keys", "preprocessing width", "not JSON", "missing"],
)
def test_a_damaged_folder_ends_in_one_paragraph_naming_what_is_wrong(
    built, tmp_path, capsys, damage, message
):
    folder = _copy(built, SKLEARN, tmp_path)
    damage(folder)
    assert message in _cli_refused(capsys, folder, built[1])


# --- generated hostile folders ----------------------------------------------------------------


def _entries(value: object, at: tuple = ()) -> list[tuple]:
    """Every key path in a JSON value."""
    found = [at] if at else []
    if isinstance(value, dict):
        for key, inner in value.items():
            found += _entries(inner, (*at, key))
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            found += _entries(inner, (*at, i))
    return found


def _value(rng: np.random.Generator) -> object:
    """A JSON value of a random type, often one a manifest entry must not hold."""
    texts = ["", "normal", "../../etc/passwd", "/tmp", "model.keras", "é" * 3, "x" * 200]
    values = [
        None,
        True,
        False,
        int(rng.integers(-5, 5)),
        int(rng.integers(-(10**12), 10**12)),
        float(rng.normal() * 10.0 ** rng.integers(-3, 30)),
        float("nan"),
        float("inf"),
        texts[rng.integers(len(texts))],
        [],
        [int(rng.integers(0, 3)) for _ in range(rng.integers(1, 4))],
        {},
        {"threshold": float(rng.random())},
    ]
    return values[rng.integers(len(values))]


def _parent(manifest: dict, at: tuple) -> object:
    node: object = manifest
    for key in at[:-1]:
        node = node[key]  # type: ignore[index]
    return node


def _edit_manifest(rng, folder: Path, ctx: dict) -> bool:
    """Delete, retype or rename one random entry, or give a file name that leads out."""
    manifest = _manifest(folder)
    entries = _entries(manifest)
    # Half the time an entry near the top: the long lists (features...) would take most picks.
    if rng.random() < 0.5:
        entries = [e for e in entries if len(e) <= 2]
    at = entries[rng.integers(len(entries))]
    parent, key = _parent(manifest, at), at[-1]
    how = rng.integers(4)
    if how == 0:
        del parent[key]  # type: ignore[attr-defined]
    elif how == 1:
        parent[key] = _value(rng)  # type: ignore[index]
    elif how == 2 and isinstance(parent, dict):
        parent[f"{key}_{rng.integers(99)}"] = parent.pop(key)
    else:
        return _lead_out(rng, folder, ctx)
    _write_manifest(folder, manifest)
    return False


def _lead_out(rng, folder: Path, ctx: dict) -> bool:
    """Name a file outside the folder (with its right checksum) as the model or under files."""
    manifest = _manifest(folder)
    there = sorted(p.name for p in folder.iterdir() if p.name != rundir.DETECTOR_MANIFEST)
    model = there[rng.integers(len(there))]
    copy = ctx["outside"] / model
    shutil.copy(folder / model, copy)
    depth = "../" * int(rng.integers(1, 4))
    forms = [f"{depth}{model}", str(copy), f"sub/{depth}{model}", "..", f"{folder}/{model}"]
    name = forms[rng.integers(len(forms))]
    if not isinstance(manifest.get("files"), dict):
        manifest["files"] = {}
    manifest["files"][name] = _sum(copy.read_bytes())
    if isinstance(manifest.get("model"), dict) and rng.random() < 0.5:
        manifest["model"]["file"] = name
    _write_manifest(folder, manifest)
    return True


def _listed(rng, folder: Path) -> str:
    names = sorted(_manifest(folder)["files"])
    return names[rng.integers(len(names))]


def _truncate(rng, folder: Path, ctx: dict) -> bool:
    name = _listed(rng, folder)
    data = (folder / name).read_bytes()
    _replace(folder, name, data[: rng.integers(len(data))])
    return False


def _flip(rng, folder: Path, ctx: dict) -> bool:
    """Flip bytes of a listed file; its checksum follows half the time."""
    path = folder / _listed(rng, folder)
    data = bytearray(path.read_bytes())
    for at in rng.integers(len(data), size=rng.integers(1, 9)):
        data[at] ^= 1 << int(rng.integers(8))
    path.write_bytes(bytes(data))
    if rng.random() < 0.5:
        _reseal(folder)
    return False


def _swap(rng, folder: Path, ctx: dict) -> bool:
    """Swap two files, or put another detector's file in one's place; checksums follow."""
    name = _listed(rng, folder)
    if rng.random() < 0.5:
        other = folder / _listed(rng, folder)
        data = other.read_bytes()
        other.write_bytes((folder / name).read_bytes())
    else:
        donor = ctx["folders"][list(ctx["folders"])[rng.integers(len(ctx["folders"]))]]
        donors = sorted(p for p in donor.iterdir() if p.name != rundir.DETECTOR_MANIFEST)
        data = donors[rng.integers(len(donors))].read_bytes()
    _replace(folder, name, data)
    return False


def _remove(rng, folder: Path, ctx: dict) -> bool:
    """Delete a listed file, or its checksum entry."""
    name = _listed(rng, folder)
    if rng.random() < 0.5:
        (folder / name).unlink()
        return True
    manifest = _manifest(folder)
    del manifest["files"][name]
    _write_manifest(folder, manifest)
    return True


def _link(rng, folder: Path, ctx: dict) -> bool:
    """Make a listed file a link: to a copy outside (refused) or inside (loads)."""
    name = _listed(rng, folder)
    out = rng.random() < 0.5
    target = (ctx["outside"] if out else folder) / f"{name}.{rng.integers(10**6)}"
    shutil.move(folder / name, target)
    (folder / name).symlink_to(target)
    return out


def _payload(rng, folder: Path, ctx: dict) -> bool:
    """A pickle in place of a file, a Lambda layer, or a config naming code outside Keras."""
    manifest = _manifest(folder)
    keras = manifest["model"]["kind"] == "keras"
    how = rng.integers(3 if keras else 1)
    if how == 0:
        name = _listed(rng, folder)
        _replace(folder, name, _pickled(ctx["canary"], rng))
        return True
    if how == 1:
        _replace(folder, rundir.DETECTOR_KERAS, ctx["lambda"])
    else:
        _replace(folder, rundir.DETECTOR_KERAS, _keras_naming(folder, "evil_layers"))
    return True


def _other_model(rng, folder: Path, ctx: dict) -> bool:
    """A scikit-learn model of a random width and class count in the model's place."""
    import skops.io
    from sklearn.linear_model import LogisticRegression

    width, classes = int(rng.integers(1, 60)), int(rng.integers(2, 4))
    X = rng.normal(size=(30, width))
    model = LogisticRegression().fit(X, np.arange(30) % classes)
    path = folder.parent / "other.skops"
    skops.io.dump(model, path)
    manifest = _manifest(folder)
    _replace(folder, manifest["model"]["file"], path.read_bytes())
    return manifest["model"]["kind"] != "sklearn"


def _preprocessing(rng, folder: Path, ctx: dict) -> bool:
    """Narrow or widen the preprocessing: a column or a category less or more."""
    path = folder / rundir.DETECTOR_PREPROCESSING
    values = json.loads(path.read_text())
    if rng.random() < 0.5:
        i = int(rng.integers(len(values["numeric"])))
        del values["numeric"][i], values["medians"][i]
    else:
        column = values["categorical"][rng.integers(len(values["categorical"]))]
        values["categories"][column].append(f"new_{rng.integers(99)}")
    _replace(folder, rundir.DETECTOR_PREPROCESSING, json.dumps(values).encode())
    return True


def _not_json(rng, folder: Path, ctx: dict) -> bool:
    """Damage the manifest itself: cut it short, flip its bytes, or replace it with noise.

    Only a flip may leave it loadable (in a text it does not check, say).
    """
    path = folder / rundir.DETECTOR_MANIFEST
    data = bytearray(path.read_bytes())
    how = rng.integers(3)
    if how == 0:
        path.write_bytes(data[: rng.integers(len(data) - 1)])
    elif how == 1:
        path.write_bytes(rng.integers(0, 256, size=rng.integers(1, 64), dtype=np.uint8).tobytes())
    else:
        for at in rng.integers(len(data), size=rng.integers(1, 5)):
            data[at] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(data))
    return how != 2


MUTATIONS = (
    _edit_manifest,
    _edit_manifest,
    _truncate,
    _flip,
    _swap,
    _remove,
    _link,
    _payload,
    _other_model,
    _preprocessing,
    _not_json,
)


def test_generated_hostile_folders_are_refused_or_score_correctly(
    built, tmp_path, capsys, monkeypatch
):
    """Each of CASES folders, changed at random once or twice, is refused or scores as it must.

    A folder that loads must score as the original when its loaded files are
    unchanged, and score without error otherwise; no payload may run.
    """
    folders, source, rows, scores = built
    monkeypatch.delenv(TRUST_ENV, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    canary = tmp_path / "canary"
    (tmp_path / "evil_layers.py").write_text(f"open({str(canary)!r}, 'w').close()\n")
    keras_copy = _copy(built, KERAS, tmp_path / "lambda")
    ctx = {"folders": folders, "canary": canary, "lambda": _lambda_model(keras_copy, canary)}
    rng = np.random.default_rng(SEED)
    outcomes = {"refused": 0, "loaded": 0}
    for case in range(CASES):
        name = list(folders)[rng.integers(len(folders))]
        root = tmp_path / f"case{case}"
        ctx["outside"] = root / "outside"
        ctx["outside"].mkdir(parents=True)
        folder = _copy(built, name, root)
        chosen = [MUTATIONS[rng.integers(len(MUTATIONS))]]
        # A second change to the manifest, which the others leave readable.
        if chosen[0] is not _not_json and rng.random() < 0.4:
            chosen.append(_edit_manifest)
        must_refuse = False
        for mutate in chosen:
            must_refuse |= mutate(rng, folder, ctx)
        what = f"case {case}: {name}, {[m.__name__ for m in chosen]}"
        try:
            detector = Detector.load(folder)
        except FedadError as refusal:
            message = str(refusal)
            assert str(folder) in message and "\n" not in message, what
            outcomes["refused"] += 1
            continue
        assert not must_refuse, what
        outcomes["loaded"] += 1
        got = detector.score(rows).scores
        unchanged = all(
            (folder / f).read_bytes() == (folders[name] / f).read_bytes()
            for f in (detector.manifest["model"]["file"], *_loaded())
        )
        if unchanged:
            want = np.zeros_like(got)
            want[:, detector.columns] = scores[name][
                :, _manifest(folders[name])["model"]["classes"]
            ]
            np.testing.assert_allclose(got, want, atol=1e-6, err_msg=what)
        assert got.shape == (len(rows), len(detector.class_names)), what
        # The command line on the same folder: scores, or one paragraph and status 2.
        try:
            score.main([str(folder), str(source), "-o", str(root / "scores.csv")])
        except SystemExit as stop:
            assert stop.code == 2, what
        err = capsys.readouterr().err
        assert "Traceback" not in err, what
    assert not canary.exists()
    # Both outcomes occur: the generator makes damage that is found and damage that is harmless.
    assert outcomes["refused"] > CASES // 2 and outcomes["loaded"] >= 3, outcomes


def _loaded() -> tuple[str, ...]:
    return (rundir.DETECTOR_PREPROCESSING, rundir.DETECTOR_SCALING)
