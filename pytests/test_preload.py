"""The LD_PRELOAD library is invisible in processes that are not CPython, and guards a CPython without
picklegate installed, libpython shared or static (issue 3, acceptance 1 and 3); `picklegate run`."""

import os
import subprocess
import sys
import sysconfig

import pytest

#: Debian's python3.11 package: libpython linked into the executable. scripts/test installs it.
STATIC_PYTHON = os.environ.get("PICKLEGATE_STATIC_PYTHON") or "/usr/bin/python3.11"

APP = """
import pickle, sys
print("user code ran")
pickle.loads(open(sys.argv[1], "rb").read())
print("LOADED")
"""


def preload_path():
    proc = subprocess.run([sys.executable, "-m", "picklegate", "preload-path"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def run(argv, env, cwd):
    full = {k: v for k, v in os.environ.items() if not k.startswith("PICKLEGATE_") and k != "LD_PRELOAD"}
    full.update(env)
    return subprocess.run(argv, env=full, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_preload_path_is_an_absolute_existing_library():
    path = preload_path()
    assert os.path.isabs(path) and os.path.isfile(path) and path.endswith(".so")
    # No reference to any Python symbol, or every non-Python process would fail to start.
    needed = subprocess.run(["nm", "-D", "--undefined-only", path], capture_output=True, text=True, check=True)
    assert " Py" not in needed.stdout and "_Py" not in needed.stdout


@pytest.mark.parametrize("argv", [["/bin/true"], ["ls"], ["sh", "-c", "echo ok"]], ids=["true", "ls", "sh"])
@pytest.mark.parametrize("mode", [None, "enforce"])
def test_invisible_in_processes_that_are_not_python(argv, mode, tmp_path):
    (tmp_path / "a-file").write_text("")
    plain = run(argv, {}, tmp_path)
    env = {"LD_PRELOAD": preload_path(), **({"PICKLEGATE_MODE": mode} if mode else {})}
    proc = run(argv, env, tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, plain.stdout, "")


def interpreters():
    """(id, executable): a shared-libpython CPython (the one running the tests, outside its venv)
    and one whose libpython is linked into the executable."""
    return [("shared-libpython", os.path.realpath(sys._base_executable)), ("static-libpython", STATIC_PYTHON)]


@pytest.mark.parametrize("kind, python", interpreters(), ids=[k for k, _ in interpreters()])
def test_preload_guards_a_python_without_picklegate(kind, python, tmp_path, canary):
    path, payload = canary
    assert os.path.exists(python), f"{python} is missing: install Debian's python3.11 (apt-get install -y python3.11)"
    linked = subprocess.run(["ldd", python], capture_output=True, text=True, check=True).stdout
    if kind == "shared-libpython":
        assert "libpython" in linked, f"{python} does not use a shared libpython (Py_ENABLE_SHARED={sysconfig.get_config_var('Py_ENABLE_SHARED')})"
    else:
        assert "libpython" not in linked, f"{python} links a shared libpython"
    (tmp_path / "payload.pkl").write_bytes(payload)
    (tmp_path / "app.py").write_text(APP)
    # -I -S: no site-packages, no PYTHONPATH: picklegate is not importable the normal way.
    argv = [python, "-I", "-S", "app.py", "payload.pkl"]
    absent = run([python, "-I", "-S", "-c", "import importlib.util as u; print(u.find_spec('picklegate'))"], {}, tmp_path)
    assert absent.stdout.strip() == "None", absent.stdout + absent.stderr
    env_only = run(argv, {"PICKLEGATE_MODE": "enforce"}, tmp_path)
    assert env_only.returncode == 0 and path.exists(), "control: without the preload the payload runs"
    path.unlink()

    proc = run(argv, {"PICKLEGATE_MODE": "enforce", "LD_PRELOAD": preload_path()}, tmp_path)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("user code ran")
    assert "PickleDeniedError" in proc.stderr, proc.stderr
    assert "LOADED" not in proc.stdout
    assert not path.exists(), "the payload ran"


def test_preload_fails_closed_on_a_malformed_policy(tmp_path):
    policy = tmp_path / "bad.toml"
    policy.write_text("version = 1\n[[allow]\n")
    proc = run(
        [STATIC_PYTHON, "-I", "-S", "-c", "print('user code ran')"],
        {"PICKLEGATE_POLICY": str(policy), "LD_PRELOAD": preload_path()},
        tmp_path,
    )
    assert proc.returncode == 78 and proc.stdout == ""
    assert f"{policy}:2:9:" in proc.stderr, proc.stderr


def test_picklegate_run_sets_up_the_preload(tmp_path, canary):
    path, payload = canary
    (tmp_path / "payload.pkl").write_bytes(payload)
    (tmp_path / "app.py").write_text(APP)
    proc = run(
        [sys.executable, "-m", "picklegate", "run", "--mode", "enforce", "--preload", "--", STATIC_PYTHON, "-I", "-S", "app.py", "payload.pkl"],
        {},
        tmp_path,
    )
    assert proc.returncode != 0 and "PickleDeniedError" in proc.stderr, proc.stderr
    assert not path.exists()


@pytest.mark.parametrize("script, status", [("exit 7", 7), ("kill -TERM $$", -15)])
def test_picklegate_run_passes_exit_status_and_signals_through(script, status, tmp_path):
    proc = run([sys.executable, "-m", "picklegate", "run", "--", "sh", "-c", script], {}, tmp_path)
    assert proc.returncode == status, proc.stderr


def test_picklegate_run_exports_the_policy(tmp_path):
    policy = tmp_path / "p.toml"
    policy.write_text("version = 1\n")
    proc = run(
        [sys.executable, "-m", "picklegate", "run", "--policy", "p.toml", "--mode", "warn", "--", "sh", "-c", 'echo "$PICKLEGATE_POLICY $PICKLEGATE_MODE"'],
        {},
        tmp_path,
    )
    assert proc.stdout.strip() == f"{policy} warn", proc.stderr
