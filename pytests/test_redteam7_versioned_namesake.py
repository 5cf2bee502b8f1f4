"""Red team 7 P7: a library that is not Python exports a versioned namesake ``Py_BytesMain``
(``Py_BytesMain@V1`` kept for old programs, ``Py_BytesMain@@V2`` the default now), as glibc versions
its own functions. The preload's unversioned ``Py_BytesMain`` satisfies the program's reference to
``@V1`` (an unversioned definition matches any version), and its trampoline jumps to the definition
``dlsym`` finds, the default: an innocent program linked against V1 runs V2 under ``LD_PRELOAD``,
with no mode set (promise 2). Open: the trampoline would have to read the version the caller's own
reference names (its ``.gnu.version_r``) and ask ``dlvsym`` for it."""

import os
import shutil
import subprocess

import pytest

from test_preload import preload_path

SOURCE = os.path.join(os.path.dirname(__file__), "hosts", "redteam7_versioned_namesake.c")


@pytest.mark.xfail(strict=True, reason="red team 7 P7: a namesake's non-default symbol version is replaced "
                   "by the default one through the preload's trampoline (open)")
def test_a_program_linked_to_an_old_version_of_a_namesake_keeps_it(tmp_path):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is absent")
    (tmp_path / "v1.map").write_text("V1 { global: Py_BytesMain; local: *; };\n")
    (tmp_path / "v2.map").write_text("V1 { global: Py_BytesMain; local: *; };\nV2 { global: Py_BytesMain; } V1;\n")
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    for version, directory in (("V1", old), ("V2", new)):
        subprocess.run([gcc, "-w", "-shared", "-fPIC", f"-D{version}", f"-Wl,--version-script={tmp_path / version.lower()}.map",
                        "-Wl,-soname,libver.so", "-o", directory / "libver.so", SOURCE], check=True)
    host = tmp_path / "host"
    subprocess.run([gcc, "-w", "-o", host, SOURCE, f"-L{old}", "-lver"], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICKLEGATE_")}
    env["LD_LIBRARY_PATH"] = str(new)
    plain = subprocess.run([host], capture_output=True, text=True, env=env, timeout=60)
    assert (plain.returncode, plain.stdout) == (1, "V1\n"), plain.stderr
    env["LD_PRELOAD"] = preload_path()
    preloaded = subprocess.run([host], capture_output=True, text=True, env=env, timeout=60)
    assert (preloaded.returncode, preloaded.stdout, preloaded.stderr) == (1, "V1\n", "")
