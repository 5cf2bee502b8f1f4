"""An allowed load behaves exactly as without picklegate (issue 10): the same legitimate code gives
the same values, positions, errors and sizes unguarded, in warn and in record; under enforce a live
unpickler of any class runs exactly the bytes that were judged."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


CHILD = Path(__file__).with_name("fidelity_child.py")
SCENARIOS = [
    "multiple_unpicklings_seekable", "multiple_unpicklings_unseekable", "multiple_unpicklings_minimal",
    "reused_after_rewrite", "memo_priming", "stream_of_dumps", "load_stored_on_a_class", "sizes",
    "persistent_ids", "file_positions", "errors",
]


def run_child(tmp_path, **env):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PICKLEGATE_")}
    full_env.update(env)
    proc = subprocess.run([sys.executable, str(CHILD)], cwd=tmp_path, env=full_env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr}"
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def unguarded(tmp_path_factory):
    return run_child(tmp_path_factory.mktemp("unguarded"))


@pytest.fixture(scope="module", params=["warn", "record"])
def guarded(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    seen = run_child(tmp, PICKLEGATE_MODE=request.param, PICKLEGATE_RECORD=str(tmp / "records.jsonl"),
                     PICKLEGATE_LOG=str(tmp / "log.jsonl"))
    assert (tmp / "log.jsonl").stat().st_size > 0  # picklegate was really in the way of every load
    return seen


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_allowed_loads_behave_as_without_picklegate(scenario, unguarded, guarded):
    assert unguarded[scenario][0] == "ok", unguarded[scenario]
    assert guarded[scenario] == unguarded[scenario]


def test_load_functions_stay_the_builtins(run_python):
    proc = run_python("""
        import _pickle, pickle, picklegate
        picklegate.install(mode="warn")
        print(pickle.load is _pickle.load, type(pickle.load).__name__, pickle.loads is _pickle.loads,
              pickle.Unpickler is _pickle.Unpickler)
    """, env={"PICKLEGATE_LOG": os.devnull}, check=True)
    assert proc.stdout.split() == ["True", "builtin_function_or_method", "True", "True"]


EARLY_CLASS = """
import hashlib, io, os, pickle, sys
class U(pickle.Unpickler):                      # made before install, resolves names itself
    def find_class(self, module, name):
        import importlib; return getattr(importlib.import_module(module), name)
BENIGN = pickle.dumps({"ok": [1, 2]}, protocol=2)
# A load from a file is judged on the rest of the file: two pickles, then the last one alone.
allowed = "".join(f'[[allow]]\\nsha256 = "{hashlib.sha256(b).hexdigest()}"\\ncallsite = "__main__:*"\\n'
                  for b in (BENIGN, BENIGN * 2))
open("pickles.toml", "w").write("version = 1\\n" + allowed)
import picklegate
picklegate.install(policy="pickles.toml", mode="enforce")
PAYLOAD = open(sys.argv[1], "rb").read()

class Shifty(io.BytesIO):
    # Serves the reviewed bytes to the first read of the whole rest, then the payload.
    def read(self, n=-1):
        if n is None or n < 0:
            data, self.served = (BENIGN, True) if not getattr(self, "served", False) else (PAYLOAD, True)
            self.seek(len(data), 1)
            return data
        return PAYLOAD[:n]

def attempt(label, fn):
    try:
        print(label, fn())
    except picklegate.PickleDeniedError as error:
        print(label, "DENIED", error.sha256 == hashlib.sha256(PAYLOAD).hexdigest())

reused = U(io.BytesIO(BENIGN * 2))
attempt("first", reused.load)
attempt("second", reused.load)
attempt("payload", U(io.BytesIO(PAYLOAD)).load)
attempt("shifty", U(Shifty(BENIGN + PAYLOAD)).load)
denied = io.BytesIO(PAYLOAD)
attempt("payload again", U(denied).load)
print("left at", denied.tell())
"""


def test_enforce_judges_each_load_of_a_live_unpickler_on_the_bytes_it_runs(run_python, canary, tmp_path):
    path, payload = canary
    (tmp_path / "payload.pkl").write_bytes(payload)
    proc = run_python(EARLY_CLASS, args=[str(tmp_path / "payload.pkl")], check=True)
    assert proc.stdout.splitlines() == [
        "first {'ok': [1, 2]}", "second {'ok': [1, 2]}", "payload DENIED True", "shifty {'ok': [1, 2]}",
        "payload again DENIED True", "left at 0",
    ]
    assert not path.exists()


def test_the_unpickler_layout_is_learnt_not_assumed(run_python):
    """The fields a live unpickler reads through are found by probing this CPython; if picklegate
    did not find them, loads by classes made before install would be refused as unverifiable."""
    proc = run_python("""
        import io, pickle
        class Early(pickle.Unpickler):
            pass
        data = pickle.dumps([1, 2])
        import picklegate
        open("pickles.toml", "w").write(
            f'version = 1\\n[[allow]]\\nsha256 = "{picklegate.sha256(data)}"\\ncallsite = "__main__:*"\\n')
        picklegate.install(policy="pickles.toml", mode="enforce")
        print(Early(io.BytesIO(data)).load())
    """, check=True)
    assert proc.stdout.strip() == "[1, 2]"


QUIET = """
import logging, pickle, sys
logging.basicConfig(stream=sys.stdout)          # the application's own output
if sys.argv[1:] == ["opt-in"]:
    logging.getLogger("picklegate").setLevel(logging.INFO)
pickle.loads(pickle.dumps([1]))
logging.getLogger("app").warning("application line")
"""


@pytest.mark.parametrize("opt_in", [False, True])
def test_the_python_logger_reaches_the_applications_handlers_only_when_asked(run_python, tmp_path, opt_in):
    log = tmp_path / "picklegate.jsonl"
    proc = run_python(QUIET, args=["opt-in"] if opt_in else [], check=True,
                      env={"PICKLEGATE_MODE": "warn", "PICKLEGATE_LOG": str(log)})
    assert '"decision":"warn"' in log.read_text()  # the event went where PICKLEGATE_LOG says
    lines = proc.stdout.splitlines()
    assert "WARNING:app:application line" in lines
    assert any(line.startswith("WARNING:picklegate:") for line in lines) == opt_in


@pytest.mark.parametrize("how", [["-W", "error"], ["-o", "filterwarnings=error"]])
def test_pytest_treating_warnings_as_errors_runs_with_picklegate_active(tmp_path, how):
    (tmp_path / "test_one.py").write_text("import pickle\n\ndef test_one():\n    assert pickle.loads(pickle.dumps(1)) == 1\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICKLEGATE_")}
    env.update(PICKLEGATE_MODE="warn", PICKLEGATE_LOG=os.devnull)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *how, "test_one.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout


DILL_SESSION = """
import dill, io, pickle, sys
from contextlib import suppress as quiet        # restored by find_class after the load
from calendar import day_name
x = [1, 2, 3]
def restore():
    dill.load_module("session.pkl")
if sys.argv[1] == "save":
    dill.dump_module("session.pkl", refimported=True)
else:
    del x, quiet, day_name
    restore()
    print(x, quiet.__name__, day_name[0])
    try:                                         # no hole: find_class outside that load is judged
        pickle.Unpickler(io.BytesIO(b"")).find_class("os", "system")
        print("resolved os.system")
    except pickle.UnpicklingError as error:
        print(type(error).__name__)
"""


def test_dill_session_restores_its_imports_under_enforce_with_a_frozen_manifest(run_python, tmp_path):
    import dill  # noqa: F401  (installed by the [test] extra: a missing library is a failure, not a skip)
    run_python(DILL_SESSION, args=["save"], check=True)
    run_python(DILL_SESSION, args=["load"], check=True,
               env={"PICKLEGATE_MODE": "record", "PICKLEGATE_RECORD": str(tmp_path / "records.jsonl"),
                    "PICKLEGATE_LOG": os.devnull})
    subprocess.run([sys.executable, "-m", "picklegate", "freeze", str(tmp_path / "records.jsonl"), "-o",
                    str(tmp_path / "pickles.toml")], check=True, capture_output=True)
    proc = run_python(DILL_SESSION, args=["load"], check=True,
                      env={"PICKLEGATE_POLICY": str(tmp_path / "pickles.toml"), "PICKLEGATE_LOG": os.devnull})
    assert proc.stdout.splitlines() == ["[1, 2, 3] suppress Monday", "PickleDeniedError"]


def test_scripts_peers_fails_on_a_test_whose_outcome_changes_with_picklegate(tmp_path, monkeypatch):
    """scripts/peers compares per test, not counts: one test that fails only under record is named."""
    import importlib.machinery
    import importlib.util

    path = str(Path(__file__).parents[1] / "scripts" / "peers")
    spec = importlib.util.spec_from_loader("peers", importlib.machinery.SourceFileLoader("peers", path))
    peers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peers)
    suite = tmp_path / "test_synthetic.py"
    suite.write_text("import os\n\ndef test_same():\n    pass\n\n"
                     "def test_changes():\n    assert os.environ.get('PICKLEGATE_MODE') != 'record'\n"
                     "\ndef test_skipped_then_passes():\n    import pytest\n"
                     "    if 'PICKLEGATE_MODE' not in os.environ:\n        pytest.skip('baseline')\n")
    monkeypatch.setitem(peers.SUITES, "synthetic", peers.PYTEST + [str(suite)])
    monkeypatch.setattr(peers, "suite_options", lambda name, xml: ["--junitxml", xml, "--rootdir", str(tmp_path)])
    work = tmp_path / "work"
    work.mkdir()
    report = peers.compare("synthetic", str(work))
    assert report["tests"] == 3
    assert sorted(report["changed"]["warn"]) == ["test_synthetic::test_skipped_then_passes"]
    assert sorted(report["changed"]["record"]) == ["test_synthetic::test_changes", "test_synthetic::test_skipped_then_passes"]
    assert report["flaky"] == {"warn": {}, "record": {}}
