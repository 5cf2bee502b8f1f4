"""Red team 4, C10 (broke an innocent program; fixed): `picklegate run` puts the preload first in
LD_PRELOAD, before a dlopen/dlsym interposer the user preloads (VirtualGL's libdlfaker, apitrace,
Steam's overlay, a test harness). The preload's dlopen/dlsym jumped straight to libc's
(`dlvsym(RTLD_NEXT, name, GLIBC_*)` skips an unversioned definition), so the user's interposer was
never called; they now forward to the next definition, as without picklegate."""

import os
import shutil
import subprocess
import sys

import pytest
from test_preload import run

SOURCE = os.path.join(os.path.dirname(__file__), "hosts", "redteam4_interposer.c")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is absent")
    out = tmp_path_factory.mktemp("interposer")
    app, interposer = str(out / "app"), str(out / "libinterposer.so")
    subprocess.run([gcc, "-w", "-DAPP", "-o", app, SOURCE, "-ldl"], check=True, capture_output=True)
    subprocess.run([gcc, "-w", "-shared", "-fPIC", "-o", interposer, SOURCE, "-ldl"], check=True, capture_output=True)
    return app, interposer


@pytest.mark.parametrize("mode", ["enforce", "warn"])
def test_picklegate_run_keeps_the_users_own_dlopen_interposer(built, mode, tmp_path):
    app, interposer = built
    plain = run([app], {"LD_PRELOAD": interposer}, tmp_path)
    assert plain.stdout == "dlopen: redirected\ndlsym: answered\n", plain.stdout + plain.stderr
    guarded = run([sys.executable, "-m", "picklegate", "run", "--mode", mode, "--", app], {"LD_PRELOAD": interposer}, tmp_path)
    assert (guarded.stdout, guarded.returncode) == (plain.stdout, plain.returncode), guarded.stdout + guarded.stderr
