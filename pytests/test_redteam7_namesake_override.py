"""Red team 7 P16: ELF interposition between two libraries that are not Python. libB defines a
default ``Py_Initialize`` and calls it through its PLT; libA, earlier in the program's search order,
overrides it (the way a malloc replacement overrides libc's): the loader binds B's call to A's.
The preload's trampoline ranked the caller's own scope first, so under ``LD_PRELOAD`` (no mode
needed) B's call reached B's own definition: an innocent program changed behaviour (promise 2).
The caller's own scope now comes first only when its definition is a libpython's (red team 3 B6);
a namesake there yields to the global scope's, as the loader orders them."""

import os
import shutil
import subprocess

import pytest

from test_preload import preload_path

SOURCE = os.path.join(os.path.dirname(__file__), "hosts", "redteam7_override.c")


@pytest.mark.parametrize("mode", [None, "enforce"])
def test_a_library_overriding_a_namesake_keeps_overriding_it(tmp_path, mode):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is absent")
    for lib in ("A", "B"):
        subprocess.run([gcc, "-w", "-shared", "-fPIC", f"-DLIB_{lib}", "-o", tmp_path / f"lib{lib}.so", SOURCE],
                       check=True)
    host = tmp_path / "host"
    subprocess.run([gcc, "-w", "-o", host, SOURCE, f"-L{tmp_path}", "-Wl,--no-as-needed", "-lA", "-lB",
                    f"-Wl,-rpath,{tmp_path}"], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICKLEGATE_")}
    plain = subprocess.run([host], capture_output=True, text=True, env=env, timeout=60)
    assert (plain.returncode, plain.stdout) == (0, "A override\n"), plain.stderr
    env["LD_PRELOAD"] = preload_path()
    if mode is not None:
        env["PICKLEGATE_MODE"] = mode
    preloaded = subprocess.run([host], capture_output=True, text=True, env=env, timeout=60)
    assert (preloaded.returncode, preloaded.stdout, preloaded.stderr) == (0, "A override\n", "")
