"""`picklegate scan` reads every file the libraries write (issue 13, acceptance 1): every
scikit-learn estimator that fits (joblib plain and compress=3, pickle protocol 5), pandas frames
and numpy arrays of each dtype kind (joblib, pickle, .npy, .npz), torch files: zero errors, and
the scan sees past joblib's inline arrays (the joblib file shows the globals the pickle shows)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

WRITER = pathlib.Path(__file__).with_name("corpus") / "library_files.py"
# numpy's own reducers for arrays, which joblib replaces by its NumpyArrayWrapper
NUMPY_ARRAY_REDUCERS = {"numpy._core.numeric._frombuffer", "numpy._core.multiarray._reconstruct"}


@pytest.fixture(scope="module")
def library_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("library-files")
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(WRITER), str(out)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.splitlines()[-1])
    scan = subprocess.run([sys.executable, "-m", "picklegate", "scan", "--json", str(out)], capture_output=True, text=True)
    summaries = {pathlib.Path(s["file"]).name: s for s in json.loads(scan.stdout)["files"]}
    return info, summaries


def test_every_estimator_that_fits_is_written(library_files):
    info, _ = library_files
    # scikit-learn 1.9 has 208 estimators, 166 of which fit with their defaults on this data
    assert len(info["estimators"]) >= 150, info["not_fitted"]
    for model in ["DecisionTreeClassifier", "RandomForestClassifier", "HistGradientBoostingClassifier",
                  "GradientBoostingRegressor", "KNeighborsClassifier", "IsolationForest"]:
        assert model in info["estimators"]


def test_zero_errors(library_files):
    info, summaries = library_files
    assert sorted(summaries) == sorted(info["written"])
    errors = {name: s["error"] for name, s in summaries.items() if s.get("error")}
    assert errors == {}
    assert {s["verdict"] for s in summaries.values()} <= {"data", "unknown", "code", "none"}


def test_torch_files_are_written_and_scan_clean(library_files):
    _, summaries = library_files
    formats = {name: s["format"] for name, s in summaries.items() if name.startswith("torch-")}
    assert formats == {"torch-state-dict.pt": "torch zip", "torch-whole-sequential.pt": "torch zip",
                       "torch-whole-module-with-buffers.pt": "torch zip", "torch-tensors-of-dtypes.pt": "torch zip",
                       "torch-checkpoint-with-optimizer.pt": "torch zip", "torch-legacy-format.pt": "torch legacy"}
    assert summaries["torch-state-dict.pt"]["verdict"] == "data"
    assert summaries["torch-whole-sequential.pt"]["verdict"] == "unknown"


def test_formats_are_told_by_content(library_files):
    _, summaries = library_files
    formats = {name: s["format"] for name, s in summaries.items()}
    assert formats["numpy-all.npz"] == formats["numpy-all-compressed.npz"] == "npz"
    assert formats["sklearn-DecisionTreeClassifier.z3.joblib"] == "joblib zlib"
    assert formats["sklearn-DecisionTreeClassifier.joblib"] == formats["pandas-categorical.to_pickle.pkl"] == "pickle"


def test_joblib_files_show_what_their_pickle_shows(library_files):
    # The arrays joblib writes inline come before later globals: a scan that stopped at the
    # first array, or misread its bytes, would miss them.
    _, summaries = library_files
    compared = 0
    for name, summary in summaries.items():
        if not name.endswith(".p5.pkl"):
            continue
        stem = name[: -len(".p5.pkl")]
        expected = {g["name"] for g in summary["globals"]} - NUMPY_ARRAY_REDUCERS
        for joblib_name in (f"{stem}.joblib", f"{stem}.z3.joblib"):
            found = {g["name"] for g in summaries[joblib_name]["globals"]}
            assert expected <= found, (joblib_name, expected - found)
            compared += 1
    assert compared > 400
    tree = {g["name"] for g in summaries["sklearn-DecisionTreeClassifier.joblib"]["globals"]}
    assert {"sklearn.tree._tree.Tree", "joblib.numpy_pickle.NumpyArrayWrapper"} <= tree
