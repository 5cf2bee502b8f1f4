"""Red team 4, attacks C7/C8/C16 (C7 and C16 fixed, C8 open): `picklegate run --mode enforce` refuses
a set-user-ID command and a `#!` script whose interpreter is one, but missed a set-user-ID CPython reached (C7) through a
`#!/usr/bin/env -S INTERPRETER ARGS` line (the interpreter is inside env's -S string), or (C8) through
a wrapper command (`env`, `nice`, `sh -c`...) that execs it: glibc drops the LD_PRELOAD there, so the
CPython runs every pickle."""

import os
import pickle
import shutil
import subprocess
import sys

import pytest
from test_preload_embedded import Touch
from test_redteam3_setuid_run import shared_dir  # noqa: F401 (a fixture)


def setup(tmp_path):
    setpriv = shutil.which("setpriv")
    python = "/usr/bin/python3"
    if os.geteuid() != 0 or setpriv is None or not os.path.isfile(python):
        pytest.skip("needs root, setpriv and a system /usr/bin/python3 to make and run a setuid CPython")
    setuid_python = tmp_path / "python-setuid"
    shutil.copy(python, setuid_python)
    setuid_python.chmod(0o4755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICKLEGATE_") and k != "LD_PRELOAD"}
    as_nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    runner = sys.executable
    if subprocess.run([*as_nobody, runner, "-c", "import picklegate"], env=env, cwd=tmp_path,
                      capture_output=True, timeout=120).returncode != 0:
        # This Python is out of uid 65534's reach (pyenv under /root): the system one, with the
        # wheel under test unpacked where that user can read it.
        wheel = os.environ.get("PICKLEGATE_TEST_WHEEL")
        if wheel is None:
            pytest.skip("uid 65534 cannot run this Python, and PICKLEGATE_TEST_WHEEL names no wheel to give /usr/bin/python3")
        site = tmp_path / "site"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), wheel],
                       check=True, timeout=300)
        runner, env = python, {**env, "PYTHONPATH": str(site)}
    reachable = subprocess.run([*as_nobody, runner, "-c", "import picklegate"], env=env, cwd=tmp_path,
                               capture_output=True, text=True, timeout=120)
    assert reachable.returncode == 0, f"uid 65534 cannot run {runner} and picklegate: {reachable.stderr.strip()[-300:]}"
    canary = tmp_path / "canary"
    code = f"import pickle; pickle.loads(bytes.fromhex('{pickle.dumps(Touch(canary)).hex()}')); print('LOADED')"
    run = [*as_nobody, runner, "-m", "picklegate", "run", "--mode", "enforce", "--"]
    return setuid_python, code, canary, run, env


def check(argv, env, tmp_path, canary):
    proc = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "cannot run" not in proc.stderr, proc.stderr
    assert not canary.exists(), f"attacker bytes RAN under picklegate run --mode enforce:\n{proc.stdout}{proc.stderr}"
    assert proc.returncode == 78, proc.stdout + proc.stderr


def test_c7_env_split_string_shebang_to_a_setuid_python(shared_dir):  # noqa: F811
    setuid_python, code, canary, run, env = setup(shared_dir)
    script = shared_dir / "script.py"
    script.write_text(f"#!/usr/bin/env -S {setuid_python} -S\n{code}\n")
    script.chmod(0o755)
    check([*run, str(script)], env, shared_dir, canary)


@pytest.mark.xfail(strict=True, reason="red-team 4 C8: a wrapper command (env) execs a setuid python")
def test_c8_wrapper_command_execs_a_setuid_python(shared_dir):  # noqa: F811
    setuid_python, code, canary, run, env = setup(shared_dir)
    check([*run, "env", str(setuid_python), "-S", "-c", code], env, shared_dir, canary)


def test_c16_picklegate_run_with_mixed_real_and_effective_uid(shared_dir):  # noqa: F811
    """C16 (fixed): `picklegate run` itself started with real uid != effective uid (from a set-user-ID
    helper, or a service that changed only one of them): every program it execs gets AT_SECURE, so
    glibc drops the LD_PRELOAD path even for an ordinary CPython."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to run with real uid 65534 and effective uid 0")
    canary = shared_dir / "canary"
    code = f"import pickle; pickle.loads(bytes.fromhex('{pickle.dumps(Touch(canary)).hex()}')); print('LOADED')"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICKLEGATE_") and k != "LD_PRELOAD"}
    mixed = [setpriv, "--ruid=65534", "--euid=0", "--clear-groups"]
    check([*mixed, sys.executable, "-m", "picklegate", "run", "--mode", "enforce", "--", sys.executable, "-S", "-c", code],
          env, shared_dir, canary)
