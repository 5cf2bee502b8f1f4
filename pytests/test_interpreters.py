"""Every CPython from 3.9 to 3.14 gets the full guarantee, and `enforce` never runs weaker than it
says: where a redirect cannot be set up it refuses to start, unless the operator opts in to the
audit-hook backstop alone (issue 10). scripts/test-pythons runs this file on every version."""

import hashlib
import importlib.metadata
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import picklegate

#: The example of issue 10: an Unpickler subclass made before install whose find_class resolves
#: names itself, so no audit event is raised: only the C-level redirect of Unpickler.load sees it.
SELF_RESOLVING_BEFORE_INSTALL = """
import io, os, pickle, sys

class U(pickle.Unpickler):                      # defined before install
    def find_class(self, module, name):         # no super(): no audit event
        import importlib
        return getattr(importlib.import_module(module), name)

payload = open(sys.argv[1], "rb").read()
{install}
try:
    U(io.BytesIO(payload)).load()
    print("LOADED")
except pickle.UnpicklingError as error:
    print("REFUSED", type(error).__name__, error)
"""

#: Something replaced `_pickle.loads` before picklegate was imported (as a hook like fickling's
#: does): picklegate cannot reach the C function, so its redirects cannot be set up.
REPLACED_BEFORE_IMPORT = """
import _pickle

_c_loads = _pickle.loads
def wrapped_loads(data, /, **options):
    return _c_loads(data, **options)
_pickle.loads = wrapped_loads
"""


def test_the_issue_example_is_refused_under_enforce(run_python, canary, tmp_path):
    path, payload = canary
    (tmp_path / "payload.pkl").write_bytes(payload)
    code = SELF_RESOLVING_BEFORE_INSTALL.format(install='import picklegate; picklegate.install(mode="enforce")')
    proc = run_python(code, args=["payload.pkl"])
    assert proc.returncode == 0, proc.stderr
    assert "REFUSED PickleDeniedError" in proc.stdout, proc.stdout + proc.stderr
    # Judged on the bytes it was about to run (their sha256 is named), not refused blind.
    assert hashlib.sha256(payload).hexdigest() in proc.stdout
    assert not path.exists(), f"the payload ran on CPython {sys.version}"


def test_the_example_loads_as_before_without_enforce(run_python, tmp_path):
    # The redirect on this version runs the original C code for an allowed load: warn lets it run.
    import pickle

    (tmp_path / "data.pkl").write_bytes(pickle.dumps({"a": [1, 2]}))
    code = SELF_RESOLVING_BEFORE_INSTALL.format(install='import picklegate; picklegate.install(mode="warn")')
    code += "print(U(io.BytesIO(payload)).load())\n"
    proc = run_python(code, args=["data.pkl"], env={"PICKLEGATE_LOG": str(tmp_path / "log.jsonl")})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["LOADED", "{'a': [1, 2]}"]


def test_enforce_refuses_to_start_where_a_redirect_cannot_be_set_up(run_python):
    code = REPLACED_BEFORE_IMPORT + """
import picklegate
try:
    picklegate.install(mode="enforce")
    print("INSTALLED")
except picklegate.PolicyError as error:
    print("POLICY ERROR", error)
"""
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("POLICY ERROR"), proc.stdout
    assert "not redirected: _pickle.loads (_pickle.loads is not a C function" in proc.stdout
    assert "PICKLEGATE_BACKSTOP_ONLY=1" in proc.stdout


def test_other_modes_start_where_a_redirect_cannot_be_set_up(run_python, tmp_path):
    code = REPLACED_BEFORE_IMPORT + "import picklegate\nprint(picklegate.install(mode='warn') is not None)\n"
    proc = run_python(code, env={"PICKLEGATE_LOG": str(tmp_path / "log.jsonl")})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"


def test_enforce_from_the_environment_exits_78_with_the_reason(run_python):
    # The start-up hook and the preload both call from_environment(); here after the replacement.
    code = REPLACED_BEFORE_IMPORT + """
import os
os.environ["PICKLEGATE_MODE"] = "enforce"
from picklegate._activate import from_environment
from_environment()
print("RUNNING")
"""
    proc = run_python(code)
    assert proc.returncode == 78, proc.stdout + proc.stderr
    assert "RUNNING" not in proc.stdout
    assert "not redirected: _pickle.loads" in proc.stderr
    assert "stopping, rather than run unguarded" in proc.stderr


def _backstop_only_run(run_python, canary, tmp_path, install, env):
    path, payload = canary
    (tmp_path / "payload.pkl").write_bytes(payload)
    code = REPLACED_BEFORE_IMPORT + """
import pickle, sys
from pickle import loads as captured
import picklegate
{install}
for load in (captured, pickle.loads):
    try:
        load(open(sys.argv[1], "rb").read())
        print("LOADED")
    except pickle.UnpicklingError as error:
        print("REFUSED", type(error).__name__)
""".format(install=install)
    proc = run_python(code, args=["payload.pkl"], env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["REFUSED PickleDeniedError"] * 2, proc.stdout + proc.stderr
    assert "enforce runs BACKSTOP-ONLY" in proc.stderr
    assert "not redirected: _pickle.loads" in proc.stderr
    assert proc.stderr.count("BACKSTOP-ONLY") == 1, "said once"
    assert not path.exists()


def test_backstop_only_by_the_environment_runs_and_says_so(run_python, canary, tmp_path):
    _backstop_only_run(run_python, canary, tmp_path, 'picklegate.install(mode="enforce")',
                       {"PICKLEGATE_BACKSTOP_ONLY": "1"})


def test_backstop_only_in_code_runs_and_says_so(run_python, canary, tmp_path):
    _backstop_only_run(run_python, canary, tmp_path, 'picklegate.install(mode="enforce", backstop_only=True)', {})


def test_backstop_only_with_a_bad_value_is_a_policy_error(run_python):
    code = REPLACED_BEFORE_IMPORT + """
import picklegate
try:
    picklegate.install(mode="enforce")
except picklegate.PolicyError as error:
    print(error)
"""
    proc = run_python(code, env={"PICKLEGATE_BACKSTOP_ONLY": "yes please"})
    assert "PICKLEGATE_BACKSTOP_ONLY=\"yes please\": expected 1" in proc.stdout, proc.stdout + proc.stderr


def test_a_later_install_of_enforce_is_refused_too(run_python, tmp_path):
    # Activation is done once; switching to enforce afterwards must not skip the check.
    code = REPLACED_BEFORE_IMPORT + """
import picklegate
picklegate.install(mode="warn")
try:
    picklegate.install(mode="enforce")
    print("INSTALLED")
except picklegate.PolicyError as error:
    print("POLICY ERROR")
"""
    proc = run_python(code, env={"PICKLEGATE_LOG": str(tmp_path / "log.jsonl")})
    assert proc.stdout.strip() == "POLICY ERROR", proc.stdout + proc.stderr


def _broken_site(tmp_path):
    """A copy of the installed distribution whose compiled core cannot load (as on an interpreter
    it was not built for), entry points and all."""
    site = tmp_path / "site"
    package = pathlib.Path(picklegate.__file__).parent
    shutil.copytree(package, site / "picklegate", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    (site / "picklegate" / "_core.abi3.so").write_bytes(b"not a shared object")
    shim = importlib.util.find_spec("picklegate_pytest")
    if shim is not None:
        shutil.copy(shim.origin, site)
    dist = importlib.metadata.distribution("picklegate")
    info = site / f"picklegate-{dist.version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: picklegate\nVersion: {dist.version}\n")
    (info / "entry_points.txt").write_text(dist.read_text("entry_points.txt"))
    return site


def test_pytest_runs_where_picklegate_cannot_load(tmp_path):
    site = _broken_site(tmp_path)
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_one.py").write_text(
        "import pytest\n\n"
        "def test_picklegate_is_unloadable_here():\n"
        "    with pytest.raises(ImportError):\n"
        "        import picklegate\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PICKLEGATE_", "PYTEST_"))}
    env["PYTHONPATH"] = str(site)

    def pytest(*args):
        return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args, str(tests)],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    plain = pytest()
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert "1 passed" in plain.stdout
    asked = pytest("--picklegate=enforce")
    assert asked.returncode == 4, asked.stdout + asked.stderr  # a usage error, not a run without it
    assert "picklegate cannot load in this Python" in asked.stderr
    assert "1 passed" not in asked.stdout
