"""Red team 5 E7: the preload's ``Py_Initialize*``/``Py_*Main`` wrappers (red team 4 C1/C2/C5) took
the arguments CPython's have and forwarded only those. An innocent program that is not Python,
linked to a library exporting functions of the same names with other signatures (more arguments,
vector or variadic ones, a pointer where CPython returns a struct), got its calls forwarded with
arguments lost: it crashed under ``LD_PRELOAD``, even with no mode set (promise 2: programs that do
not load pickles are untouched). Now a call whose definition is not a libpython's is forwarded
untouched, every argument register as the program set it; a libpython's is still wrapped (the
preload tests and red team 4's)."""

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from test_preload import preload_path, run
from test_redteam3_unseen_libpython import builtin_pickle_libpython

HOSTS = os.path.join(os.path.dirname(__file__), "hosts")
REINIT_REPORTED = "picklegate cannot guard a re-initialized interpreter (Py_Initialize after Py_FinalizeEx)"
EXPECTED = [
    "Py_BytesMain 1 tag-ok",
    "Py_Main 1",
    "Py_FrozenMain 1 frozen-ok",
    "Py_Initialize 2.50 init-ok",
    "Py_InitializeEx ex-ok 0.5 1 2 3 4 5 6.5",
    "Py_InitializeFromConfig cfg-config-ok",
    "rc 7 3 5 11 13 config-ok",
]


@pytest.fixture(scope="module")
def namesake_host(tmp_path_factory):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is absent")
    tmp_path = tmp_path_factory.mktemp("namesake")
    source = os.path.join(HOSTS, "redteam5_namesake.c")
    lib, host = tmp_path / "libnamesake.so", tmp_path / "host"
    subprocess.run([gcc, "-w", "-shared", "-fPIC", "-DLIBRARY", "-o", lib, source], check=True)
    subprocess.run([gcc, "-w", "-o", host, source, f"-L{tmp_path}", "-lnamesake", f"-Wl,-rpath,{tmp_path}"], check=True)
    plain = subprocess.run([host], capture_output=True, text=True, timeout=60)
    assert (plain.returncode, plain.stdout.splitlines()) == (0, EXPECTED), plain.stderr
    return host


@pytest.mark.parametrize("mode", [None, "enforce", "warn"])
def test_namesakes_of_the_start_up_functions_are_untouched(namesake_host, mode):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICKLEGATE_")}
    env["LD_PRELOAD"] = preload_path()
    if mode is not None:
        env["PICKLEGATE_MODE"] = mode
    preloaded = subprocess.run([namesake_host], capture_output=True, text=True, timeout=60, env=env)
    assert (preloaded.returncode, preloaded.stdout.splitlines(), preloaded.stderr) == (0, EXPECTED, "")


@pytest.fixture(scope="module")
def reinit_host(tmp_path_factory):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is absent")
    host = str(tmp_path_factory.mktemp("reinit") / "reinit_entry")
    libdir, version = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDVERSION")
    subprocess.run([gcc, "-w", "-o", host, os.path.join(HOSTS, "redteam5_reinit_entry.c"),
                    f"-I{sysconfig.get_config_var('INCLUDEPY')}", f"-L{libdir}", f"-lpython{version}",
                    f"-Wl,-rpath,{libdir}"], check=True)
    return host


@pytest.mark.parametrize("entry", ["Py_Initialize", "Py_InitializeEx", "Py_InitializeFromConfig",
                                   "Py_BytesMain", "Py_Main", "Py_FrozenMain"])
def test_a_libpythons_start_up_functions_are_still_wrapped(reinit_host, entry, tmp_path):
    """A libpython's definition still goes through the preload's wrapper, which alone stops (here, in
    warn mode, reports) a runtime started again after Py_FinalizeEx at that call."""
    proc = run([reinit_host, entry], {"PYTHONHOME": sys.base_prefix, "LD_PRELOAD": preload_path(),
                                      "PICKLEGATE_MODE": "warn"}, tmp_path)
    assert REINIT_REPORTED in proc.stderr, proc.stdout + proc.stderr
    assert "this process runs UNGUARDED" in proc.stderr
    if entry != "Py_FrozenMain":  # the host freezes no __main__: Py_FrozenMain fails once started
        assert (proc.returncode, proc.stdout) == (0, "second runtime ran\n"), proc.stderr


def test_a_namesake_shim_that_starts_a_self_bound_libpython_is_still_checked(tmp_path):
    """A shim's Py_Main (not CPython) is called untouched, but after the wrapper's check: the
    self-bound libpython it forwards to starts with no other call reaching the preload."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is absent")
    lib, home = builtin_pickle_libpython()
    source = os.path.join(HOSTS, "redteam5_shim.c")
    shim, host = tmp_path / "libshim.so", tmp_path / "shimmed"
    subprocess.run([gcc, "-w", "-DSHIM", "-shared", "-fPIC", "-o", shim, source, "-ldl"], check=True)
    subprocess.run([gcc, "-w", "-o", host, source, f"-L{tmp_path}", "-lshim", f"-Wl,-rpath,{tmp_path}", lib,
                    f"-Wl,-rpath,{os.path.dirname(lib)}", "-ldl"], check=True)
    plain = run([host], {"PYTHONHOME": home}, tmp_path)
    assert (plain.returncode, plain.stdout) == (0, "second runtime ran\n"), plain.stderr
    proc = run([host], {"PYTHONHOME": home, "LD_PRELOAD": preload_path(), "PICKLEGATE_MODE": "warn"}, tmp_path)
    assert REINIT_REPORTED in proc.stderr, proc.stdout + proc.stderr
    assert (proc.returncode, proc.stdout) == (0, "second runtime ran\n"), proc.stderr
