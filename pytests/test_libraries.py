"""The libraries users load models with, installed for real: each file is allowed by the sha256
`picklegate hash` prints, refused with one byte changed, refused when malicious (canary), and
named by the user's own function as callsite (issue 5)."""

import functools
import hashlib
import json
import os
import subprocess
import sys
import pathlib

import pytest

CHILD = pathlib.Path(__file__).with_name("library_child.py")
LIBRARIES = [
    "torch", "joblib", "joblib-zlib", "joblib-gzip", "joblib-bz2", "joblib-lzma", "joblib-xz",
    "numpy", "numpy-npz", "pandas", "dill", "cloudpickle",
]
REQUIRED = {"torch": "torch", "numpy": "numpy", "pandas": "pandas", "dill": "dill", "cloudpickle": "cloudpickle", "joblib": "joblib"}


def require(module):
    """A missing library is a failed set-up, never a skipped test."""
    try:
        __import__(module)
    except ImportError:
        pytest.fail(f"{module} is not installed: run `bash scripts/test` (it installs `pip install .[test]`)")


@functools.lru_cache(maxsize=None)
def child_report(lib, workdir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICKLEGATE_")}
    env["PICKLEGATE_LOG"] = os.path.join(workdir, "decisions.jsonl")
    proc = subprocess.run([sys.executable, str(CHILD), lib, workdir], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.fixture(params=LIBRARIES)
def report(request, tmp_path_factory):
    lib = request.param
    require(REQUIRED[lib.split("-")[0]])
    return child_report(lib, str(tmp_path_factory.mktemp(lib)))


@pytest.mark.parametrize("lib", LIBRARIES)
def test_control_the_malicious_file_runs_without_picklegate(lib, tmp_path):
    require(REQUIRED[lib.split("-")[0]])
    proc = subprocess.run([sys.executable, str(CHILD), lib, str(tmp_path), "control"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == {"canary": True}


def test_saved_file_loads_when_listed_by_picklegate_hash(report):
    assert report["allowed"] not in ("", None)
    assert "1" in report["allowed"] or "2" in report["allowed"]


def test_allowed_file_is_read_once(report):
    """The library gets the bytes picklegate hashed; it never opens the file a second time."""
    assert report["opens_of_allowed_file"] == 1


def test_one_changed_byte_is_refused_at_the_users_callsite(report):
    assert report["flipped"]["result"] == "denied"
    assert report["flipped"]["callsite"] == "__main__:load_user_model"
    assert report["flipped"]["sha256"] != report["listed"]


def test_malicious_file_in_the_librarys_own_format_is_refused(report):
    assert report["evil"]["result"] == "denied"
    assert report["evil"]["callsite"] == "__main__:load_user_model"
    assert report["canary"] is False


def test_listed_file_at_another_callsite_is_refused(report):
    assert report["elsewhere"] == {"result": "denied", "callsite": "__main__:somewhere_else", "sha256": report["listed"]}


TORCH_MODES = """
import os, sys, torch, picklegate
torch.save({"w": torch.arange(6.0).reshape(2, 3)}, "model.pt")
sha = picklegate.sha256(open("model.pt", "rb").read())
open("pickles.toml", "w").write(f'version = 1\\n[[allow]]\\nsha256 = "{sha}"\\ncallsite = "__main__:serve"\\n')
picklegate.install(policy="pickles.toml")
def serve(**kwargs):
    return torch.load("model.pt", **kwargs)["w"].sum().item()
print(serve(), serve(weights_only=False), serve(weights_only=True), serve(map_location="cpu"), serve(mmap=True), serve(mmap=True, weights_only=False))
"""


def test_torch_safe_loader_map_location_and_mmap_keep_working(run_python):
    require("torch")
    proc = run_python(TORCH_MODES, check=True)
    assert proc.stdout.split() == ["15.0"] * 6


SWAP = """
import os, joblib, numpy, picklegate
from picklegate import _core
class Canary:
    def __reduce__(self):
        return (os.system, ("touch CANARY",))
joblib.dump({"a": numpy.arange(3)}, "model.joblib")
joblib.dump(Canary(), "evil.joblib")
sha = picklegate.sha256(open("model.joblib", "rb").read())
open("pickles.toml", "w").write(f'version = 1\\n[[allow]]\\nsha256 = "{sha}"\\ncallsite = "__main__:*"\\n')
picklegate.install(policy="pickles.toml")
decide = _core.guarded_container
def swap_then_decide(*args):
    if os.path.exists("evil.joblib"):
        os.replace("evil.joblib", "model.joblib")   # the attacker swaps the file after it was read
    return decide(*args)
_core.guarded_container = swap_then_decide
print(joblib.load("model.joblib"))
print(os.path.exists("CANARY"))
"""


def test_a_file_swapped_after_the_check_is_not_what_runs(run_python):
    require("joblib")
    proc = run_python(SWAP, check=True)
    assert proc.stdout.split("\n")[:2] == ["{'a': array([0, 1, 2])}", "False"]


SKLEARN = """
import sys, joblib, numpy
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.linear_model import LogisticRegression
rng = numpy.random.default_rng(0)
X = rng.normal(size=(200, 4)); y = (X[:, 0] + X[:, 1] > 0).astype(int)
if sys.argv[1] == "save":
    model = make_pipeline(StandardScaler(), LogisticRegression()).fit(X, y)
    joblib.dump(model, "pipeline.joblib")
    numpy.save("expected.npy", model.predict_proba(X))
else:
    import picklegate
    picklegate.install(policy="pickles.toml")
    def load_pipeline():
        return joblib.load("pipeline.joblib")
    print(numpy.array_equal(load_pipeline().predict_proba(X), numpy.load("expected.npy")))
"""


def test_sklearn_pipeline_saved_with_joblib_predicts_the_same_under_enforce(run_python, tmp_path):
    require("sklearn")
    run_python(SKLEARN, args=["save"], check=True)
    sha = hashlib.sha256((tmp_path / "pipeline.joblib").read_bytes()).hexdigest()
    (tmp_path / "pickles.toml").write_text(f'version = 1\n[[allow]]\nsha256 = "{sha}"\ncallsite = "__main__:load_pipeline"\n')
    proc = run_python(SKLEARN, args=["load"], check=True)
    assert proc.stdout.strip() == "True"


DILL_FIRST = """
import dill, os
dill.dump({"k": [1, 2]}, open("listed.dill", "wb"))
dill.dump({"k": [3]}, open("unlisted.dill", "wb"))
import picklegate     # after dill: dill.Unpickler was made from the unguarded _pickle.Unpickler
sha = picklegate.sha256(open("listed.dill", "rb").read())
open("pickles.toml", "w").write(f'version = 1\\n[[allow]]\\nsha256 = "{sha}"\\ncallsite = "__main__:restore"\\n')
picklegate.install(policy="pickles.toml")
def restore(path):
    with open(path, "rb") as f:
        return dill.load(f)
print(restore("listed.dill"))
try:
    restore("unlisted.dill")
except picklegate.PickleDeniedError as error:
    print("DENIED", error.callsite)
try:
    dill.Unpickler(open("listed.dill", "rb")).load()   # the pre-install class, judged on its bytes here
except picklegate.PickleDeniedError as error:
    print("DENIED", error.callsite, error.sha256 == sha)
"""


def test_a_library_imported_before_install_still_loads_listed_files(run_python):
    require("dill")
    proc = run_python(DILL_FIRST, check=True)
    assert proc.stdout.splitlines() == ["{'k': [1, 2]}", "DENIED __main__:restore", "DENIED __main__:<module> True"]
