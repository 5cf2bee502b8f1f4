"""Red team 3, breakages B1-B5: the preload's dlopen (in every process of a host-wide deployment,
picklegate configured or not) must load what glibc's loads. Each case runs a small C program
without and with LD_PRELOAD and expects the same output and exit status.
B1 dlopen("$ORIGIN/...") from a program whose own RPATH has no $ORIGIN (segfault in dlinfo);
B2/B3 glibc-hwcaps and legacy platform subdirectories of the caller's RUNPATH/RPATH;
B4 the caller's RPATH copy fails to load (glibc reports it, the preload loads another one);
B5 a loaded library that the preload's own search path reaches under the same name;
B6 a second libpython's Py_Initialize routed to the first one's."""

import os
import shutil
import subprocess
import sys

import pytest
from test_preload import preload_path, run

PLUGIN = r"""
#include <dlfcn.h>
#include <stdio.h>
int plugin_load(const char *name) {
    void *h = dlopen(name, RTLD_NOW);
    if (!h) { printf("dlopen(%s) failed: %s\n", name, dlerror()); return 1; }
    printf("dlopen(%s) foo()=%d\n", name, ((int (*)(void))dlsym(h, "foo"))());
    return 0;
}
"""
MAIN = r"""
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>
int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argv[2][0] && !dlopen(argv[2], RTLD_NOW | RTLD_GLOBAL)) { printf("pre: %s\n", dlerror()); return 3; }
    if (!strcmp(argv[1], "self")) { /* the program itself calls dlopen */
        void *h = dlopen(argv[3], RTLD_NOW);
        if (!h) { printf("dlopen(%s) failed: %s\n", argv[3], dlerror()); return 1; }
        printf("dlopen(%s) foo()=%d\n", argv[3], ((int (*)(void))dlsym(h, "foo"))());
        return 0;
    }
    void *p = dlopen(argv[1], RTLD_NOW);
    if (!p) { printf("plugin: %s\n", dlerror()); return 2; }
    return ((int (*)(const char *))dlsym(p, "plugin_load"))(argv[3]);
}
"""


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is absent")
    d = tmp_path_factory.mktemp("dlcompat")
    (d / "plug.c").write_text(PLUGIN)
    (d / "main.c").write_text(MAIN)

    def cc(*argv):
        subprocess.run([gcc, "-w", *map(str, argv)], check=True, capture_output=True, text=True, cwd=d)

    def foo(path, value, *extra):
        path = d / path
        path.parent.mkdir(parents=True, exist_ok=True)
        src = d / f"foo{value}.c"
        src.write_text(f"int foo(void) {{ return {value}; }}\n")
        cc("-shared", "-fPIC", "-o", path, src, *extra)

    cc("-o", "main", "main.c", "-ldl", "-Wl,--no-as-needed")
    foo("libself.so", 9)
    foo("hw/libfoo.so", 1)
    foo("hw/glibc-hwcaps/x86-64-v2/libfoo.so", 2)
    cc("-shared", "-fPIC", "-o", "plug_hw.so", "plug.c", f"-Wl,--enable-new-dtags,-rpath,{d}/hw")
    foo("leg/libfoo.so", 1)
    foo("leg/x86_64/libfoo.so", 3)
    cc("-shared", "-fPIC", "-o", "plug_leg.so", "plug.c", f"-Wl,--disable-new-dtags,-rpath,{d}/leg")
    (d / "gone.c").write_text("int gone(void) { return 0; }\n")
    (d / "bd").mkdir()
    cc("-shared", "-fPIC", "-o", "bd/libmissing.so", "gone.c")
    foo("bd/libfoo.so", 5, "-Wl,--no-as-needed", f"-L{d}/bd", "-lmissing")
    os.remove(d / "bd" / "libmissing.so")
    foo("good/libfoo.so", 6)
    cc("-shared", "-fPIC", "-o", "plug_bd.so", "plug.c", f"-Wl,--disable-new-dtags,-rpath,{d}/bd")
    foo("sys/libfoo.so.1", 7, "-Wl,-soname,libfoo.so.1")
    os.symlink("libfoo.so.1", d / "sys" / "libfoo.so")
    foo("own/libfoo.so", 8)
    cc("-shared", "-fPIC", "-o", "plug_own.so", "plug.c", f"-Wl,--disable-new-dtags,-rpath,{d}/own")
    return d


CASES = {
    "B1-origin-from-program": ("self", "", "$ORIGIN/libself.so", None),
    "B2-runpath-glibc-hwcaps": ("plug_hw.so", "", "libfoo.so", None),
    "B3-rpath-legacy-platform-dir": ("plug_leg.so", "", "libfoo.so", None),
    "B4-rpath-copy-fails-to-load": ("plug_bd.so", "", "libfoo.so", "good"),
    "B5-loaded-under-another-name": ("plug_own.so", "libfoo.so.1", "libfoo.so", "sys"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_the_preloads_dlopen_loads_what_glibcs_loads(tree, case, tmp_path):
    plugin, first, name, library_path = CASES[case]
    argv = [str(tree / "main"), str(tree / plugin) if plugin != "self" else "self", first, name]
    env = {"LD_LIBRARY_PATH": str(tree / library_path)} if library_path else {}
    plain = run(argv, env, tmp_path)
    assert "foo()" in plain.stdout or "failed" in plain.stdout, plain.stdout + plain.stderr
    proc = run(argv, {**env, "LD_PRELOAD": preload_path()}, tmp_path)
    assert (proc.returncode, proc.stdout) == (plain.returncode, plain.stdout), (
        f"without the preload: rc={plain.returncode} {plain.stdout!r}\n"
        f"with the preload:    rc={proc.returncode} {proc.stdout!r} {proc.stderr}"
    )


def test_a_second_libpython_starts_itself_not_the_first(tmp_path):
    """B6: a program loads two libpythons RTLD_LOCAL (here two copies of this CPython's) and starts
    the second. Its Py_Initialize calls Py_InitializeEx through its PLT, which reaches the preload's;
    `real_initializer` then calls the FIRST libpython's (RTLD_NEXT / first loaded object exporting
    it), so the second's runtime is never set up: a crash, with picklegate not even configured."""
    from test_preload_embedded import shared_libpython
    from test_redteam3_unseen_libpython import SOURCE

    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is absent")
    host = str(tmp_path / "unseen")
    subprocess.run([gcc, "-w", "-o", host, SOURCE, "-ldl"], check=True, capture_output=True, text=True)
    first = shared_libpython()
    (tmp_path / "copy").mkdir()
    second = str(tmp_path / "copy" / os.path.basename(first))
    shutil.copy(first, second)
    argv = [host, "second", first, second, "import sys; print('RAN', sys.version_info[:2])"]
    plain = run(argv, {"PYTHONHOME": sys.base_prefix}, tmp_path)
    assert plain.returncode == 0 and "RAN" in plain.stdout, plain.stdout + plain.stderr
    proc = run(argv, {"PYTHONHOME": sys.base_prefix, "LD_PRELOAD": preload_path()}, tmp_path)
    assert (proc.returncode, proc.stdout) == (plain.returncode, plain.stdout), (
        f"with the preload (not configured): rc={proc.returncode} {proc.stdout!r}\n{proc.stderr[-800:]}"
    )
