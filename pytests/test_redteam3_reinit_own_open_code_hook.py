"""Red team 3, attack A3: an embedding host with its own open-code hook (PEP 578's verified-loading
use) keeps it, so the preload's finalization backstop (`arm_open_code_backstop`) is never set; the
host starts the runtime through dlsym on libpython's handle, and a -fno-semantic-interposition
libpython (Debian's) never calls the preload's Py_Initialize*: runtime 2 runs unguarded."""

import os
import pickle
import shutil
import subprocess

import pytest
from test_preload import preload_path, run
from test_preload_embedded import Touch
from test_redteam3_unseen_libpython import builtin_pickle_libpython

SOURCE = os.path.join(os.path.dirname(__file__), "hosts", "redteam3_reinit_hook.c")


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is absent")
    out = str(tmp_path_factory.mktemp("reinit") / "reinit_hook")
    subprocess.run([gcc, "-w", "-o", out, SOURCE, "-ldl"], check=True, capture_output=True, text=True)
    return out


def code(canary):
    payload = pickle.dumps(Touch(canary), protocol=0)
    return f"import pickle; pickle._loads(bytes.fromhex('{payload.hex()}')); print('LOADED', flush=True)"


def test_a_runtime_restarted_under_a_hosts_own_open_code_hook_never_runs_unguarded(host, tmp_path):
    lib, home = builtin_pickle_libpython()
    control = tmp_path / "control"
    plain = run([host, lib, "pass", code(control)], {"PYTHONHOME": home}, tmp_path)
    assert control.exists(), "control: the payload should run without picklegate\n" + plain.stderr
    first, second = tmp_path / "canary1", tmp_path / "canary2"
    refused_first = f"try:\n {code(first)}\nexcept Exception as e: print('refused', type(e).__name__, flush=True)"
    env = {"PYTHONHOME": home, "LD_PRELOAD": preload_path(), "PICKLEGATE_MODE": "enforce"}
    proc = run([host, lib, refused_first, code(second)], env, tmp_path)
    assert not first.exists(), proc.stdout + proc.stderr
    assert "refused PickleDeniedError" in proc.stdout, "runtime 1 should be guarded\n" + proc.stdout + proc.stderr
    assert not second.exists(), f"attacker bytes RAN in runtime 2 under enforce:\n{proc.stdout}{proc.stderr}"
