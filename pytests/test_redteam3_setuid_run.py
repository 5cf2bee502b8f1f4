"""Red team 3, attack A5: `picklegate run --mode enforce` on a set-user-ID CPython. glibc runs a
setuid program in secure-execution mode and drops an LD_PRELOAD path containing a slash, so the
preload never loads; a CPython without picklegate in its site-packages then runs every pickle,
silently. (The host-wide /etc/ld.so.preload is honoured there; `picklegate run` is not.)"""

import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import tempfile

import pytest
from test_preload_embedded import Touch


@pytest.fixture
def shared_dir():
    """A directory the unprivileged user can reach (pytest's tmp_path is under a 0700 directory)."""
    path = tempfile.mkdtemp(prefix="pg-setuid-", dir="/tmp")
    os.chmod(path, 0o777)
    yield pathlib.Path(path)
    shutil.rmtree(path)


def test_picklegate_run_never_leaves_a_setuid_python_unguarded(shared_dir):
    python = next((p for p in ("/usr/bin/python3", f"/usr/bin/python3.{sys.version_info[1]}") if os.path.isfile(p)), None)
    if os.geteuid() != 0 or python is None:
        pytest.skip("needs root (to make a set-user-ID copy) and a system /usr/bin/python3")
    tmp_path = shared_dir
    # Owned by uid 65534 and set-user-ID: run by root, it runs with euid 65534 != ruid 0, so glibc
    # runs it in secure-execution mode, as a setuid program run by any other user would be.
    setuid_python = tmp_path / "python-setuid"
    shutil.copy(python, setuid_python)
    os.chown(setuid_python, 65534, 65534)
    setuid_python.chmod(0o4755)
    canary = tmp_path / "canary"
    payload = pickle.dumps(Touch(canary))
    code = f"import pickle; pickle.loads(bytes.fromhex('{payload.hex()}')); print('LOADED')"
    picklegate = [sys.executable, "-m", "picklegate", "run", "--mode", "enforce", "--"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICKLEGATE_") and k != "LD_PRELOAD"}
    # -S: the setuid copy's own site-packages play no part (the preload is what `run` promises).
    proc = subprocess.run([*picklegate, str(setuid_python), "-S", "-c", code],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert not canary.exists(), f"attacker bytes RAN under picklegate run --mode enforce:\n{proc.stdout}{proc.stderr}"
    assert proc.returncode == 78 and "set-user-ID" in proc.stderr, proc.stdout + proc.stderr
