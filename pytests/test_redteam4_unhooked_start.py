"""Red team 4, attacks C1-C5: a libpython started where none of the preload's hooks runs, so attacker
bytes run under enforce. The preload looks for a new libpython only at `dlsym` and at its own
`Py_Initialize*`; these hosts reach neither:
C1/C2 a plugin linked to a libpython whose internal calls are bound inside it (Debian's, built with
      -fno-semantic-interposition: Py_BytesMain calls Py_InitializeFromConfig directly) starts it with
      Py_BytesMain, from its constructor (C1) or from a function the host calls after dlopen (C2);
C3    the same plugin linked to this CPython's libpython, dlopen'ed with RTLD_DEEPBIND: the plugin's
      and libpython's own references (Py_InitializeFromConfig, the dlsym of extension modules) bind
      inside the plugin's scope, never to the preload;
C4    the plugin loaded with dlmopen(LM_ID_NEWLM): the preload is not in the new namespace at all;
C5    a program with a weak, lazily bound Py_BytesMain that dlopen's the libpython RTLD_GLOBAL.
C17   as C2, the plugin starting a frozen program with Py_FrozenMain (Tools/freeze).
C15   a plugin with CPython linked into it (a distribution's libpython3.X-pic.a) and -Bsymbolic: its
      Py_BytesMain -> Py_InitializeFromConfig calls are bound inside it.
C1, C2, C5 and C17 are fixed (the preload wraps Py_BytesMain, Py_Main and Py_FrozenMain too); C3, C4 and C15 are open."""

import glob
import os
import shutil
import subprocess
import sys

import pytest
from test_preload import preload_path, run
from test_preload_embedded import runtime_code, shared_libpython
from test_redteam3_unseen_libpython import builtin_pickle_libpython

HOSTS = os.path.join(os.path.dirname(__file__), "hosts")


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is absent")
    out = tmp_path_factory.mktemp("redteam4")
    host_source = os.path.join(HOSTS, "redteam4_host.c")
    host, lazy = str(out / "host"), str(out / "lazy")
    subprocess.run([gcc, "-w", "-rdynamic", "-o", host, host_source, "-ldl"], check=True, capture_output=True)
    subprocess.run([gcc, "-w", "-DLAZY", "-fno-pie", "-no-pie", "-Wl,-z,lazy", "-o", lazy, host_source, "-ldl"],
                   check=True, capture_output=True)

    def plugin(libpython, name):
        path = str(out / name)
        subprocess.run([gcc, "-w", "-shared", "-fPIC", "-o", path, os.path.join(HOSTS, "redteam4_plugin.c"),
                        libpython, f"-Wl,-rpath,{os.path.dirname(libpython)}"], check=True, capture_output=True)
        return path

    return host, lazy, plugin


def attempt(argv, env, tmp_path, name):
    """Runs the host without picklegate (the payload must run: the setup works), then under enforce
    with an empty manifest (the payload must not run)."""
    control = tmp_path / f"{name}-control"
    plain = run([a.replace("CODE", runtime_code(control)) for a in argv],
                {k: v.replace("CODE", runtime_code(control)) for k, v in env.items()}, tmp_path)
    assert control.exists(), f"control: the payload should run without picklegate\n{plain.stdout}{plain.stderr}"
    canary = tmp_path / f"{name}-canary"
    policy = tmp_path / "empty.toml"
    policy.write_text("version = 1\n")
    guarded = {"LD_PRELOAD": preload_path(), "PICKLEGATE_MODE": "enforce", "PICKLEGATE_POLICY": str(policy)}
    guarded.update({k: v.replace("CODE", runtime_code(canary)) for k, v in env.items()})
    proc = run([a.replace("CODE", runtime_code(canary)) for a in argv], guarded, tmp_path)
    assert not canary.exists(), f"attacker bytes RAN under enforce ({name}):\n{proc.stdout}{proc.stderr}"
    assert "LOADED" not in proc.stdout


def test_c1_plugin_constructor_starts_a_self_bound_libpython(build, tmp_path):
    host, _, plugin = build
    lib, home = builtin_pickle_libpython()
    attempt([host, "dlopen", plugin(lib, "plugin_builtin.so"), "unused", "local"],
            {"PYTHONHOME": home, "RT4_CODE": "CODE"}, tmp_path, "c1")


def test_c2_plugin_start_after_dlopen_of_a_self_bound_libpython(build, tmp_path):
    host, _, plugin = build
    lib, home = builtin_pickle_libpython()
    attempt([host, "dlopen", plugin(lib, "plugin_builtin.so"), "CODE", "local"], {"PYTHONHOME": home}, tmp_path, "c2")


@pytest.mark.xfail(strict=True, reason="red-team 4 C3: a plugin dlopen'ed RTLD_DEEPBIND binds libpython's calls past the preload")
def test_c3_deepbind_plugin(build, tmp_path):
    host, _, plugin = build
    lib = plugin(shared_libpython(), "plugin_this.so")
    attempt([host, "dlopen", lib, "CODE", "deepbind,global"], {"PYTHONHOME": sys.base_prefix}, tmp_path, "c3")


@pytest.mark.xfail(strict=True, reason="red-team 4 C4: dlmopen(LM_ID_NEWLM): the preload is not in the new namespace")
def test_c4_dlmopen_plugin_starts_in_its_constructor(build, tmp_path):
    host, _, plugin = build
    lib = plugin(shared_libpython(), "plugin_this.so")
    attempt([host, "dlmopen", lib], {"PYTHONHOME": sys.base_prefix, "RT4_CODE": "CODE"}, tmp_path, "c4")


def test_c5_lazily_bound_py_bytesmain(build, tmp_path):
    _, lazy, _ = build
    lib, home = builtin_pickle_libpython()
    attempt([lazy, "lazy", lib, "CODE"], {"PYTHONHOME": home}, tmp_path, "c5")


def pic_archive():
    """A distribution's position-independent libpython archive, its python and home, or skip."""
    for archive in sorted(glob.glob("/usr/lib/python3.*/config-3.*/libpython3.*-pic.a")):
        version = archive.split("/")[3][len("python"):]
        python = f"/usr/bin/python{version}"
        if os.path.isfile(python):
            return archive, python, "/usr"
    pytest.skip("no distribution libpython3.X-pic.a")


@pytest.mark.xfail(strict=True, reason="red-team 4 C15: CPython linked into a -Bsymbolic plugin starts with no call reaching the preload")
def test_c15_plugin_with_cpython_linked_in_bsymbolic(build, tmp_path):
    host, _, _ = build
    archive, python, home = pic_archive()
    libs = subprocess.run([python, "-c", "import sysconfig as s; print(s.get_config_var('LIBS'), s.get_config_var('MODLIBS'))"],
                          check=True, capture_output=True, text=True).stdout.split()
    plugin = str(tmp_path / "plugin_static.so")
    subprocess.run([shutil.which("gcc"), "-w", "-shared", "-fPIC", "-o", plugin, os.path.join(HOSTS, "redteam4_plugin.c"),
                    "-Wl,-Bsymbolic", "-Wl,--whole-archive", archive, "-Wl,--no-whole-archive", *libs],
                   check=True, capture_output=True)
    attempt([host, "dlopen", plugin, "CODE", "local"], {"PYTHONHOME": home}, tmp_path, "c15")


def test_c17_plugin_starts_a_frozen_program_with_py_frozenmain(build, tmp_path):
    host, _, _ = build
    lib, home = builtin_pickle_libpython()
    version = os.path.basename(lib)[len("libpython") : -len(".so.1.0")]
    python = f"/usr/bin/python{version}"
    if not os.path.isfile(python):
        pytest.skip(f"{python} is absent (it marshals the frozen program for {lib})")
    if tuple(map(int, version.split("."))) < (3, 11):
        pytest.skip("the plugin declares CPython 3.11+'s struct _frozen")
    control, canary = tmp_path / "c17-control", tmp_path / "c17-canary"
    plugins = []
    for target in (control, canary):
        header = tmp_path / f"{target.name}.h"
        marshal = "import marshal, sys; b = marshal.dumps(compile(sys.argv[1], '<frozen __main__>', 'exec')); " \
                  "print('static const unsigned char frozen_main[] = {' + ','.join(map(str, b)) + '};')"
        header.write_text(subprocess.run([python, "-c", marshal, runtime_code(target)], check=True, capture_output=True,
                                         text=True).stdout)
        plugin = str(tmp_path / f"{target.name}.so")
        subprocess.run([shutil.which("gcc"), "-w", "-shared", "-fPIC", "-DFROZEN_MAIN", "-include", str(header), "-o",
                        plugin, os.path.join(HOSTS, "redteam4_plugin.c"), lib, f"-Wl,-rpath,{os.path.dirname(lib)}"],
                       check=True, capture_output=True)
        plugins.append(plugin)
    plain = run([host, "dlopen", plugins[0], "unused", "local"], {"PYTHONHOME": home}, tmp_path)
    assert control.exists(), f"control: the payload should run without picklegate\n{plain.stdout}{plain.stderr}"
    policy = tmp_path / "empty.toml"
    policy.write_text("version = 1\n")
    env = {"PYTHONHOME": home, "LD_PRELOAD": preload_path(), "PICKLEGATE_MODE": "enforce", "PICKLEGATE_POLICY": str(policy)}
    proc = run([host, "dlopen", plugins[1], "unused", "local"], env, tmp_path)
    assert not canary.exists(), f"attacker bytes RAN under enforce (c17):\n{proc.stdout}{proc.stderr}"
    assert "LOADED" not in proc.stdout
