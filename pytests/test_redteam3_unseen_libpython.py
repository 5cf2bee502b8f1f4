"""Red team 3, attacks A1/A2: a libpython the preload never sees runs attacker bytes under enforce.
A1: the host loads libpython with libc's own dlopen (a pointer from dlsym on libc's handle), which
the preload's interposed dlopen never sees. A2: a second libpython loaded after a first one was
armed (FOUND is set once, later loads are not looked at). The started libpython is one whose
pickle/os modules are built in (Debian's), so no extension-module dlopen reaches the preload."""

import glob
import os
import pickle
import shutil
import subprocess

import pytest
from test_preload import preload_path, run
from test_preload_embedded import Touch, shared_libpython

SOURCE = os.path.join(os.path.dirname(__file__), "hosts", "redteam3_unseen.c")


def builtin_pickle_libpython():
    """A distribution libpython (/usr/lib/<triplet>/libpython3.X.so.1.0) and its home, or skip."""
    for lib in sorted(glob.glob("/usr/lib/*/libpython3.*.so.1.0")):
        version = os.path.basename(lib)[len("libpython") : -len(".so.1.0")]
        if os.path.isdir(f"/usr/lib/python{version}/encodings"):
            return lib, "/usr"
    pytest.skip("no distribution libpython3.X.so.1.0 with its stdlib under /usr")


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is absent")
    out = str(tmp_path_factory.mktemp("unseen") / "unseen")
    subprocess.run([gcc, "-w", "-o", out, SOURCE, "-ldl"], check=True, capture_output=True, text=True)
    return out


def code(canary):
    payload = pickle.dumps(Touch(canary))
    return f"import pickle; pickle.loads(bytes.fromhex('{payload.hex()}')); print('LOADED', flush=True)"


@pytest.mark.parametrize("how", ["libcptr", "second"], ids=["libc-dlopen-pointer", "second-libpython"])
def test_a_libpython_the_preload_does_not_see_never_runs_unguarded(host, how, tmp_path):
    lib, home = builtin_pickle_libpython()
    libs = [lib] if how == "libcptr" else [shared_libpython(), lib]
    control = tmp_path / "control"
    plain = run([host, how, *libs, code(control)], {"PYTHONHOME": home}, tmp_path)
    assert control.exists(), "control: the payload should run without picklegate\n" + plain.stderr
    canary = tmp_path / "canary"
    env = {"PYTHONHOME": home, "LD_PRELOAD": preload_path(), "PICKLEGATE_MODE": "enforce"}
    proc = run([host, how, *libs, code(canary)], env, tmp_path)
    assert not canary.exists(), f"attacker bytes RAN under enforce ({how}):\n{proc.stdout}{proc.stderr}"
    assert "LOADED" not in proc.stdout
