"""Red team 5 E7: the preload's ``Py_BytesMain``/``Py_Main`` wrappers (red team 4 C1/C2/C5) take
the two arguments CPython's have and forward only those. An innocent program that is not Python,
linked to a library exporting a function of the same name with another signature (here a third
argument), gets its call forwarded with that argument lost: it crashes under ``LD_PRELOAD``,
even with no mode set (promise 2: programs that do not load pickles are untouched)."""

import os
import shutil
import subprocess

import pytest

from test_preload import preload_path

HOSTS = os.path.join(os.path.dirname(__file__), "hosts")


@pytest.mark.xfail(strict=True, reason="red team 5 E7: the Py_BytesMain wrapper drops a namesake's extra arguments")
def test_a_namesake_py_bytesmain_is_untouched(tmp_path):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is absent")
    source = os.path.join(HOSTS, "redteam5_namesake.c")
    lib, host = tmp_path / "libnamesake.so", tmp_path / "host"
    subprocess.run([gcc, "-w", "-shared", "-fPIC", "-DLIBRARY", "-o", lib, source], check=True)
    subprocess.run([gcc, "-w", "-o", host, source, f"-L{tmp_path}", "-lnamesake", f"-Wl,-rpath,{tmp_path}"], check=True)
    plain = subprocess.run([host], capture_output=True, text=True, timeout=60)
    assert plain.stdout.splitlines() == ["Py_BytesMain 1 tag-ok", "Py_Main 1", "rc 7 3"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICKLEGATE_")}
    preloaded = subprocess.run([host], capture_output=True, text=True, timeout=60,
                               env={**env, "LD_PRELOAD": preload_path()})
    assert (preloaded.returncode, preloaded.stdout) == (0, plain.stdout), preloaded.stderr
