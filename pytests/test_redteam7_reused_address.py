"""Red team 7 P2: the preload's look for a newly loaded libpython skipped the objects it had seen
before, known by load address only. A library that is not CPython, seen by a look (the program's
``dlsym`` on it) and unloaded, leaves its address free; a libpython of the same mapped size loaded
next lands there, is taken for the object already seen, and is never armed. Started through a shim
that is not CPython (its ``Py_BytesMain`` forwards with ``dlsym(RTLD_NEXT)``: the trampoline
takes it for a namesake, red team 5 E7), a hostile pickle ran under ``enforce``. Objects seen are
now known by name and address."""

import os
import pickle
import shutil
import struct
import subprocess

import pytest

from test_preload import preload_path
from test_redteam3_unseen_libpython import builtin_pickle_libpython

HOSTS = os.path.join(os.path.dirname(__file__), "hosts")
SOURCE = os.path.join(HOSTS, "redteam7_reused_base.c")


class Touch:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def mapped_length(path):
    """How long glibc's mapping of the ELF64 shared object `path` is (its LOAD segments, in pages)."""
    with open(path, "rb") as f:
        data = f.read()
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads = []
    for i in range(phnum):
        p_type, _, _, vaddr, _, _, memsz, _ = struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize)
        if p_type == 1:
            loads.append((vaddr, memsz))
    page = os.sysconf("SC_PAGE_SIZE")
    start = loads[0][0] // page * page
    end = -(-max(vaddr + memsz for vaddr, memsz in loads) // page) * page
    return end - start


def test_a_libpython_loaded_where_a_seen_library_was_is_still_armed(tmp_path):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is absent")
    lib, home = builtin_pickle_libpython()
    decoy, shim, host = tmp_path / "decoy.so", tmp_path / "libshim7.so", tmp_path / "host"
    subprocess.run([gcc, "-w", "-shared", "-fPIC", "-DPAD=1", "-o", decoy, SOURCE], check=True)
    pad = 1 + mapped_length(lib) - mapped_length(decoy)
    subprocess.run([gcc, "-w", "-shared", "-fPIC", f"-DPAD={pad}", "-o", decoy, SOURCE], check=True)
    assert mapped_length(decoy) == mapped_length(lib)
    subprocess.run([gcc, "-w", "-shared", "-fPIC", "-DSHIM", "-o", shim, SOURCE, "-ldl"], check=True)
    subprocess.run([gcc, "-w", "-o", host, SOURCE, f"-L{tmp_path}", "-lshim7", f"-Wl,-rpath,{tmp_path}", "-ldl"],
                   check=True)
    canary = tmp_path / "CANARY"
    code = f"import pickle; pickle.loads(bytes.fromhex('{pickle.dumps(Touch(canary)).hex()}')); print('LOADED')"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PICKLEGATE_", "PYTHON"))}
    env.update(PYTHONHOME=home, LD_PRELOAD=preload_path(), PICKLEGATE_MODE="enforce")
    proc = subprocess.run([host, decoy, lib, code], capture_output=True, text=True, env=env, timeout=120)
    lines = proc.stdout.splitlines()
    # The window: libpython is mapped where the decoy was.
    assert len(lines) >= 2 and lines[0].split()[1] == lines[1].split()[1], proc.stdout + proc.stderr
    assert not canary.exists(), proc.stdout + proc.stderr
    assert "PickleDeniedError" in proc.stderr and "LOADED" not in proc.stdout
