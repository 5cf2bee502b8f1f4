"""The preload library in programs that embed CPython (red-team S1, S5): a libpython loaded with
dlopen after start-up is guarded like one linked in; a runtime started again after Py_FinalizeEx
never runs unguarded (under enforce the process stops, exit 78). Real C hosts, built with gcc."""

import os
import pickle
import shutil
import subprocess
import sys
import sysconfig

import pytest
from test_preload import preload_path, run

HOST_SOURCE = os.path.join(os.path.dirname(__file__), "hosts", "embed.c")
EX_CONFIG = 78


class Touch:
    """Unpickling it runs `touch PATH`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def shared_libpython():
    """The shared libpython of the CPython running the tests (outside its venv), as test_preload finds it."""
    python = os.path.realpath(sys._base_executable)
    linked = subprocess.run(["ldd", python], capture_output=True, text=True, check=True).stdout
    paths = [line.split("=>")[1].split()[0] for line in linked.splitlines() if "libpython" in line and "=>" in line]
    assert paths, f"{python} does not use a shared libpython (Py_ENABLE_SHARED={sysconfig.get_config_var('Py_ENABLE_SHARED')})"
    return os.path.realpath(paths[0])


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """(linked, dlopen, plugin host, plugin, static) hosts, compiled against this CPython; the static
    one has libpython linked into the executable, where the preload's Py_Initialize* are not called."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is absent: the embedding hosts are C programs (scripts/test installs gcc)")
    out = tmp_path_factory.mktemp("hosts")
    libdir = sysconfig.get_config_var("LIBDIR")
    version = sysconfig.get_config_var("LDVERSION")
    include = sysconfig.get_config_var("INCLUDEPY")
    linked, dl = str(out / "embed_linked"), str(out / "embed_dl")
    plugin_host, plugin = str(out / "embed_plugin_host"), str(out / "libembed_plugin.so")
    static = str(out / "embed_static")
    archive = os.path.join(sysconfig.get_config_var("LIBPL"), sysconfig.get_config_var("LIBRARY"))
    assert os.path.isfile(archive), f"{archive} is missing: the static host links CPython's own libpython archive"
    system_libraries = f"{sysconfig.get_config_var('LIBS')} {sysconfig.get_config_var('SYSLIBS')}".split()
    python = [f"-I{include}", f"-L{libdir}", f"-lpython{version}", f"-Wl,-rpath,{libdir}"]
    for argv in (
        [gcc, "-w", "-DLINKED", "-o", linked, HOST_SOURCE, *python],
        [gcc, "-w", "-o", dl, HOST_SOURCE, "-ldl"],
        [gcc, "-w", "-DPLUGIN_HOST", "-o", plugin_host, HOST_SOURCE, "-ldl"],
        [gcc, "-w", "-DLINKED", "-DPLUGIN", "-shared", "-fPIC", "-o", plugin, HOST_SOURCE, *python],
        [gcc, "-w", "-DLINKED", "-o", static, HOST_SOURCE, f"-I{include}", archive, "-Wl,-E", *system_libraries],
    ):
        subprocess.run(argv, check=True, capture_output=True, text=True)
    return linked, dl, plugin_host, plugin, static


def runtime_code(canary):
    """What each runtime runs: a payload that would create `canary`, through pickle.loads."""
    payload = pickle.dumps(Touch(canary))
    return f"import pickle; pickle.loads(bytes.fromhex('{payload.hex()}')); print('LOADED', flush=True)"


def embed(argv, tmp_path, preload):
    env = {"PYTHONHOME": sys.base_prefix}
    if preload:
        env.update({"LD_PRELOAD": preload_path(), "PICKLEGATE_MODE": "enforce"})
    return run(argv, env, tmp_path)


@pytest.mark.parametrize("how", ["global", "newlm"], ids=["dlopen-rtld-global", "dlmopen-new-namespace"])
def test_preload_guards_a_libpython_loaded_with_dlopen(hosts, how, tmp_path):
    _, dl, _, _, _ = hosts
    canary = tmp_path / "CANARY"
    argv = [dl, shared_libpython(), how, runtime_code(canary)]
    control = embed(argv, tmp_path, preload=False)
    assert control.returncode == 0 and canary.exists(), "control: without the preload the payload runs\n" + control.stderr
    canary.unlink()

    proc = embed(argv, tmp_path, preload=True)
    assert "PickleDeniedError" in proc.stderr, proc.stdout + proc.stderr
    assert "[embed] runtime 1 -> -1" in proc.stderr
    assert "LOADED" not in proc.stdout
    assert not canary.exists(), "the payload ran"


def test_preload_fails_closed_in_a_libpython_loaded_with_dlopen_rtld_local(hosts, tmp_path):
    """RTLD_LOCAL keeps libpython's symbols from every extension module (pickle's _struct as well
    as picklegate's _core): the preload still finds the runtime, through the handle, and since
    picklegate cannot load there, enforce stops the process at the first import."""
    _, dl, _, _, _ = hosts
    argv = [dl, shared_libpython(), "local", "import os; print('user code ran', flush=True)"]
    control = embed(argv, tmp_path, preload=False)
    assert control.returncode == 0 and control.stdout == "user code ran\n", control.stderr
    proc = embed(argv, tmp_path, preload=True)
    assert proc.returncode == EX_CONFIG and proc.stdout == "", proc.stdout + proc.stderr
    assert "cannot load picklegate" in proc.stderr and "stopping, rather than run unguarded" in proc.stderr


@pytest.mark.parametrize("host", ["linked", "dlopen", "static"])
def test_a_reinitialized_interpreter_never_runs_unguarded(hosts, host, tmp_path):
    linked, dl, _, _, static = hosts
    first, second = tmp_path / "CANARY-1", tmp_path / "CANARY-2"
    codes = [runtime_code(first), runtime_code(second)]
    argv = {
        "linked": [linked, *codes],
        "dlopen": [dl, shared_libpython(), "global", *codes],
        "static": [static, *codes],
    }[host]
    control = embed(argv, tmp_path, preload=False)
    assert control.returncode == 0 and first.exists() and second.exists(), "control: both runtimes run the payload\n" + control.stderr
    first.unlink()
    second.unlink()

    proc = embed(argv, tmp_path, preload=True)
    assert "PickleDeniedError" in proc.stderr and "[embed] runtime 1 -> -1" in proc.stderr, proc.stderr
    # The second runtime cannot be guarded: enforce stops the process before it starts.
    assert proc.returncode == EX_CONFIG, proc.stderr
    assert "picklegate cannot guard a re-initialized interpreter" in proc.stderr
    assert "[embed] runtime 2" not in proc.stderr and "LOADED" not in proc.stdout
    assert not first.exists() and not second.exists(), "a payload ran"


def test_a_reinitialized_interpreter_is_reported_loudly_in_warn_mode(hosts, tmp_path):
    linked, _, _, _, _ = hosts
    argv = [linked, "pass", "print('second runtime ran')"]
    proc = run(argv, {"PYTHONHOME": sys.base_prefix, "LD_PRELOAD": preload_path(), "PICKLEGATE_MODE": "warn"}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "picklegate cannot guard a re-initialized interpreter" in proc.stderr
    assert "this process runs UNGUARDED" in proc.stderr
    assert proc.stdout.strip() == "second runtime ran"



def test_a_plugin_linked_to_libpython_loaded_rtld_local(hosts, tmp_path):
    """The plugin's Py_Initialize reaches the preload's, which finds libpython's outside the default
    scope: without PICKLEGATE_* the plugin runs as without the preload; with enforce the runtime is
    armed at the dlopen and, since picklegate cannot load there, stopped at the first import."""
    _, _, plugin_host, plugin, _ = hosts
    argv = [plugin_host, plugin, "print('user code ran', flush=True)"]
    plain = embed(argv, tmp_path, preload=False)
    assert (plain.returncode, plain.stdout) == (0, "user code ran\n"), plain.stderr
    unconfigured = run(argv, {"PYTHONHOME": sys.base_prefix, "LD_PRELOAD": preload_path()}, tmp_path)
    assert (unconfigured.returncode, unconfigured.stdout, unconfigured.stderr) == (0, plain.stdout, plain.stderr)
    argv = [plugin_host, plugin, "import os; print('user code ran', flush=True)"]
    proc = embed(argv, tmp_path, preload=True)
    assert proc.returncode == EX_CONFIG and proc.stdout == "", proc.stdout + proc.stderr
    assert "cannot load picklegate" in proc.stderr


@pytest.fixture(scope="module")
def loader(tmp_path_factory):
    """A program with RUNPATH $ORIGIN/lib linking a library with RUNPATH $ORIGIN/plugins."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is absent: the hosts are C programs (scripts/test installs gcc)")
    out = tmp_path_factory.mktemp("loader")
    (out / "lib").mkdir()
    (out / "plugins").mkdir()
    (out / "env").mkdir()
    source = os.path.join(os.path.dirname(__file__), "hosts", "loader.c")
    for argv in (
        [gcc, "-shared", "-fPIC", "-DFOO=42", "-o", str(out / "lib" / "libfoo_pg.so"), source],
        [gcc, "-shared", "-fPIC", "-DFOO=7", "-o", str(out / "plugins" / "libbar_pg.so"), source],
        [gcc, "-shared", "-fPIC", "-DFOO=5", "-o", str(out / "env" / "libfoo_pg.so"), source],
        [gcc, "-shared", "-fPIC", "-DLIBRARY", "-o", str(out / "libloader_pg.so"), source, "-ldl", "-Wl,--enable-new-dtags,-rpath,$ORIGIN/plugins"],
        [gcc, "-o", str(out / "loader"), source, f"-L{out}", "-lloader_pg", "-ldl", "-Wl,--enable-new-dtags,-rpath,$ORIGIN/lib:$ORIGIN"],
    ):
        subprocess.run(argv, check=True, capture_output=True, text=True)
    return str(out / "loader")


@pytest.mark.parametrize(
    "name, caller, printed",
    [("libfoo_pg.so", "program", 42), ("$ORIGIN/lib/libfoo_pg.so", "program", 42), ("libbar_pg.so", "library", 7)],
    ids=["program-runpath", "program-origin", "library-runpath"],
)
def test_the_interposed_dlopen_searches_as_the_callers_own(loader, name, caller, printed, tmp_path):
    """dlopen is interposed in every process the preload is in: a name is still searched in the
    RUNPATH of the object that called dlopen, and $ORIGIN is still that object's directory."""
    plain = run([loader, name, caller], {}, tmp_path)
    assert (plain.returncode, plain.stdout) == (0, f"foo() = {printed}\n"), plain.stdout + plain.stderr
    for env in ({"LD_PRELOAD": preload_path()}, {"LD_PRELOAD": preload_path(), "PICKLEGATE_MODE": "enforce"}):
        proc = run([loader, name, caller], env, tmp_path)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, plain.stdout, ""), proc.stdout + proc.stderr


def test_the_interposed_dlopen_keeps_ld_library_path_before_the_callers_runpath(loader, tmp_path):
    env = {"LD_LIBRARY_PATH": os.path.join(os.path.dirname(loader), "env")}
    plain = run([loader, "libfoo_pg.so", "program"], env, tmp_path)
    assert (plain.returncode, plain.stdout) == (0, "foo() = 5\n"), plain.stdout + plain.stderr
    proc = run([loader, "libfoo_pg.so", "program"], {**env, "LD_PRELOAD": preload_path(), "PICKLEGATE_MODE": "enforce"}, tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, plain.stdout, ""), proc.stdout + proc.stderr
