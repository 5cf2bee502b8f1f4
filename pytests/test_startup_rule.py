"""Where picklegate cannot load, the start-up hook (``00-picklegate.pth``) and the LD_PRELOAD library
apply one rule, ``python/picklegate/_startup.py``'s: ``enforce`` (and an unknown mode) stops with
status 78 before user code runs; ``warn``, ``record`` and ``off`` go on and say they are unguarded."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import picklegate

#: (environment, goes on): how each setting must end when picklegate cannot load.
SETTINGS = [
    ({"PICKLEGATE_POLICY": "policy.toml"}, False),
    ({"PICKLEGATE_MODE": "enforce"}, False),
    ({"PICKLEGATE_MODE": " ENFORCE "}, False),
    ({"PICKLEGATE_MODE": "enforse"}, False),
    ({"PICKLEGATE_MODE": "warn"}, True),
    ({"PICKLEGATE_MODE": " Warn "}, True),
    ({"PICKLEGATE_MODE": "record"}, True),
    ({"PICKLEGATE_MODE": "off"}, True),
    ({"PICKLEGATE_MODE": "warn", "PICKLEGATE_POLICY": "policy.toml"}, True),
]


@pytest.fixture(scope="module")
def broken_venv(tmp_path_factory):
    """A venv holding a copy of the installed picklegate (start-up hook and preload library included)
    whose compiled core cannot load, as on an interpreter it was not built for."""
    venv = tmp_path_factory.mktemp("broken") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    package = pathlib.Path(picklegate.__file__).parent
    copy = pathlib.Path(site) / "picklegate"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__", "_core*.so"))
    (copy / "_core.abi3.so").write_bytes(b"not a shared object")
    shutil.copy(package.parent / "00-picklegate.pth", site)
    return python, copy / "libpicklegate_preload.so"


def outcome(argv, env, cwd):
    full = {k: v for k, v in os.environ.items() if not k.startswith("PICKLEGATE_") and k != "LD_PRELOAD"}
    full.update(env)
    proc = subprocess.run(argv, env=full, cwd=cwd, capture_output=True, text=True, timeout=120)
    said = (
        "stops" if "stopping, rather than run unguarded" in proc.stderr
        else "goes on" if "this process runs UNGUARDED" in proc.stderr
        else "says nothing"
    )
    return proc.returncode, proc.stdout.strip(), said, "cannot load picklegate" in proc.stderr


@pytest.mark.parametrize("env, goes_on", SETTINGS, ids=[" ".join(f"{k}={v}" for k, v in e.items()) for e, _ in SETTINGS])
def test_start_up_hook_and_preload_apply_the_same_rule(env, goes_on, broken_venv, tmp_path):
    python, preload = broken_venv
    code = "print('user code ran')"
    hook = outcome([str(python), "-c", code], env, tmp_path)
    # -S: no site, so no start-up hook: only the preload starts picklegate (from the broken copy).
    base = os.path.realpath(sys._base_executable)
    by_preload = outcome([base, "-S", "-c", code], {**env, "LD_PRELOAD": str(preload)}, tmp_path)
    assert hook == by_preload
    expected = (0, "user code ran", "goes on") if goes_on else (78, "", "stops")
    assert hook == (*expected, True)
