"""Writes the files real libraries write, for the scanner to read: every scikit-learn estimator
that fits on a small data set (joblib plain and compress=3, pickle protocol 5), pandas frames and
numpy arrays of each dtype kind (joblib, pickle, .npy, .npz), torch state dicts and whole modules.

Usage: python library_files.py OUT_DIR   (prints one JSON line: what was written, and the estimators
that did not fit, with why)."""

import datetime
import decimal
import fractions
import importlib.util
import json
import pathlib
import pickle
import sys
import warnings

import joblib
import numpy
import pandas


def numpy_arrays():
    """One array per dtype kind numpy pickles differently: fixed-size, strings, datetimes,
    structured records (as in scikit-learn trees), subarrays, objects (nested pickles)."""
    arange = numpy.arange(6)
    return {
        "bool": arange % 2 == 0,
        "int8": arange.astype("i1"),
        "uint16-big-endian": arange.astype(">u2"),
        "int64": arange.astype("i8"),
        "float16": arange.astype("f2"),
        "float32-fortran": numpy.asfortranarray(numpy.arange(12, dtype="f4").reshape(3, 4)),
        "float64": arange.astype("f8"),
        "longdouble": arange.astype(numpy.longdouble),
        "complex128": arange.astype("c16"),
        "clongdouble": arange.astype(numpy.clongdouble),
        "unicode-U3": numpy.array(["a", "bc", "def"]),
        "bytes-S5": numpy.array([b"x", b"hello"]),
        "void-V7": numpy.zeros(3, dtype="V7"),
        "datetime64-ns": numpy.array(["2026-11-24T06:00", "2000-01-01"], dtype="datetime64[ns]"),
        "datetime64-D": numpy.array(["2026-11-24"], dtype="datetime64[D]"),
        "timedelta64-s": numpy.array([1, 2], dtype="timedelta64[s]"),
        "structured-tree-nodes": numpy.zeros(4, dtype=[("left_child", "<i8"), ("right_child", "<i8"), ("feature", "<i8"),
                                                       ("threshold", "<f8"), ("impurity", "<f8"), ("n_node_samples", "<i8"),
                                                       ("weighted_n_node_samples", "<f8"), ("missing_go_to_left", "u1")]),
        "structured-aligned-nested": numpy.zeros(2, dtype=numpy.dtype([("a", "u1"), ("b", [("c", "<f8"), ("d", "U2")]), ("e", "<i4", (2, 3))], align=True)),
        "structured-with-object": numpy.array([(1, "x"), (2, None)], dtype=[("n", "i4"), ("o", "O")]),
        "subarray-field-only": numpy.zeros(3, dtype=("f8", (2,))) ,
        "object-mixed": numpy.array([fractions.Fraction(1, 3), decimal.Decimal("1.5"), None, "s", datetime.date(2026, 11, 24)], dtype=object),
        "empty-float": numpy.zeros((0, 3)),
        "scalar-0d": numpy.array(3.5),
        "big-float": numpy.arange(200_000, dtype="f8"),
    }


def pandas_frames():
    n = 6
    return {
        "numeric": pandas.DataFrame({"i": range(n), "f": numpy.linspace(0, 1, n), "b": [True, False] * 3}),
        "strings-object": pandas.DataFrame({"s": list("abcdef")}, dtype=object),
        "strings-dtype": pandas.DataFrame({"s": pandas.array(list("abcdef"), dtype="string")}),
        "categorical": pandas.DataFrame({"c": pandas.Categorical(list("aabbcc"))}),
        "datetime-naive": pandas.DataFrame({"t": pandas.date_range("2026-01-01", periods=n)}),
        "datetime-tz": pandas.DataFrame({"t": pandas.date_range("2026-01-01", periods=n, tz="Europe/Paris")}),
        "timedelta-period-interval": pandas.DataFrame({"td": pandas.to_timedelta(range(n), unit="s"),
                                                       "p": pandas.period_range("2026-01", periods=n, freq="M"),
                                                       "iv": pandas.interval_range(0, n)}),
        "nullable": pandas.DataFrame({"I": pandas.array([1, None, 3, 4, 5, 6], dtype="Int64"),
                                      "B": pandas.array([True, None] * 3, dtype="boolean"),
                                      "F": pandas.array([1.5, None] * 3, dtype="Float64")}),
        "multiindex": pandas.DataFrame({"v": range(n)}, index=pandas.MultiIndex.from_product([["a", "b"], [1, 2, 3]])),
        "series": pandas.Series(numpy.arange(n), name="x"),
        "sparse": pandas.DataFrame({"s": pandas.arrays.SparseArray([0, 0, 1, 0, 2, 0])}),
    }


def sklearn_estimators():
    """Every estimator `all_estimators()` lists that fits on a small data set with its defaults."""
    from sklearn.utils import all_estimators

    rng = numpy.random.RandomState(0)
    X, y = rng.rand(40, 4), numpy.arange(40) % 3
    fitted, failed = {}, {}
    for name, cls in all_estimators():
        try:
            estimator = cls()
            try:
                estimator.fit(X, y)
            except TypeError:
                estimator.fit(X)
            fitted[name] = estimator
        except Exception as error:  # an estimator that needs arguments or other data
            failed[name] = f"{type(error).__name__}: {str(error)[:100]}"
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.tree import DecisionTreeClassifier

    fitted["Pipeline-scaler-tree"] = make_pipeline(StandardScaler(), DecisionTreeClassifier()).fit(X, y)
    return fitted, failed


def torch_files(out):
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 3)
            self.norm = torch.nn.BatchNorm2d(2)
            self.head = torch.nn.Linear(8, 3)

    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    written = []
    for name, obj in {
        "state-dict": seq.state_dict(),
        "whole-sequential": seq,
        "whole-module-with-buffers": torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)),
        "tensors-of-dtypes": {str(d): torch.zeros(3, dtype=d) for d in (torch.float16, torch.bfloat16, torch.int8, torch.bool, torch.complex64)},
        "checkpoint-with-optimizer": {"model": seq.state_dict(), "optim": torch.optim.Adam(seq.parameters()).state_dict(), "epoch": 3},
    }.items():
        path = out / f"torch-{name}.pt"
        torch.save(obj, path)
        written.append(path.name)
    legacy = out / "torch-legacy-format.pt"
    torch.save(seq.state_dict(), legacy, _use_new_zipfile_serialization=False)
    written.append(legacy.name)
    return written


def main(out):
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    warnings.simplefilter("ignore")
    written = []

    def dump_all(stem, obj, *, compress=True):
        joblib.dump(obj, out / f"{stem}.joblib")
        written.append(f"{stem}.joblib")
        if compress:
            joblib.dump(obj, out / f"{stem}.z3.joblib", compress=3)
            written.append(f"{stem}.z3.joblib")
        with open(out / f"{stem}.p5.pkl", "wb") as f:
            pickle.dump(obj, f, protocol=5)
        written.append(f"{stem}.p5.pkl")

    arrays = numpy_arrays()
    for name, array in arrays.items():
        dump_all(f"numpy-{name}", array)
        numpy.save(out / f"numpy-{name}.npy", array, allow_pickle=True)
        written.append(f"numpy-{name}.npy")
    dump_all("numpy-all-in-a-dict", arrays)
    numpy.savez(out / "numpy-all.npz", **arrays)
    numpy.savez_compressed(out / "numpy-all-compressed.npz", **arrays)
    written += ["numpy-all.npz", "numpy-all-compressed.npz"]

    for name, frame in pandas_frames().items():
        dump_all(f"pandas-{name}", frame)
        frame.to_pickle(out / f"pandas-{name}.to_pickle.pkl")
        written.append(f"pandas-{name}.to_pickle.pkl")

    fitted, failed = sklearn_estimators()
    for name, estimator in fitted.items():
        dump_all(f"sklearn-{name}", estimator)

    if importlib.util.find_spec("torch") is not None:  # only scripts/test's main interpreter has torch
        written += torch_files(out)
    print(json.dumps({"written": written, "estimators": sorted(fitted), "not_fitted": failed}))


if __name__ == "__main__":
    main(sys.argv[1])
