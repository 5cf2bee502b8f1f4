"""Start-up gaps (issue 11, finding 7): `python -S` under `picklegate run`, and the host-wide
deployment, /etc/ld.so.preload listing the preload library plus a root-owned
/etc/picklegate/policy.toml, which guards every CPython whatever its flags and environment.

The host files are never touched: each test mounts an overlay over /etc inside a private mount
namespace (`unshare -m`), which disappears with its last process."""

import os
import shutil
import subprocess
import sys

import pytest
from test_preload import APP, STATIC_PYTHON, preload_path, run

#: Each way a process may start: (id, argv after the interpreter, environment).
#: `env -i` style: nothing of the operator's environment reaches it.
STARTS = {
    "no-site": (["-S"], {}),
    "isolated-no-site": (["-I", "-S"], {}),
    "ignore-environment": (["-E"], {}),
    "environment-says-off": ([], {"PICKLEGATE_MODE": "off"}),
}

#: A parent that starts a child with an explicit, clean environment (no PICKLEGATE_*, no LD_PRELOAD).
CLEAN_CHILD = """
import subprocess, sys
child = subprocess.run([sys.executable, "-S", "app.py", sys.argv[1]], env={"PATH": "/usr/bin:/bin"})
print("child exit", child.returncode)
"""


def in_host(tmp_path, argv, policy="version = 1\n", policy_mode=0o644, preload=True):
    """Runs argv with a clean environment in a mount namespace whose /etc has the host files."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) to mount an overlay over /etc in a private namespace")
    upper, work = tmp_path / "etc-upper", tmp_path / "etc-work"
    (upper / "picklegate").mkdir(parents=True, exist_ok=True)
    work.mkdir(exist_ok=True)
    (upper / "picklegate").chmod(0o755)
    if policy is not None:
        (upper / "picklegate" / "policy.toml").write_text(policy)
        (upper / "picklegate" / "policy.toml").chmod(policy_mode)
    if preload:
        (upper / "ld.so.preload").write_text(preload_path() + "\n")
    script = f'mount -t overlay overlay -o lowerdir=/etc,upperdir={upper},workdir={work} /etc && exec "$@"'
    return subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *argv],
        env={"PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def app(tmp_path, canary):
    path, payload = canary
    (tmp_path / "payload.pkl").write_bytes(payload)
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "clean_child.py").write_text(CLEAN_CHILD)
    return path


@pytest.mark.parametrize("flags", [["-S"], ["-I", "-S"]], ids=["S", "I-S"])
def test_picklegate_run_guards_python_without_site(flags, tmp_path, app):
    """`picklegate run` preloads by default: a Python that skips site (so the .pth hook) is guarded."""
    control = run([sys.executable, *flags, "app.py", "payload.pkl"], {"PICKLEGATE_MODE": "enforce"}, tmp_path)
    assert control.returncode == 0 and app.exists(), "control: environment activation alone misses -S"
    app.unlink()
    proc = run([sys.executable, "-m", "picklegate", "run", "--mode", "enforce", "--", sys.executable, *flags, "app.py", "payload.pkl"], {}, tmp_path)
    assert proc.returncode != 0 and "PickleDeniedError" in proc.stderr, proc.stdout + proc.stderr
    assert proc.stdout.startswith("user code ran")
    assert not app.exists(), "the payload ran"


def test_picklegate_run_no_preload_is_the_environment_alone(tmp_path, app):
    proc = run([sys.executable, "-m", "picklegate", "run", "--no-preload", "--", "sh", "-c", 'echo "[$LD_PRELOAD]"'], {}, tmp_path)
    assert proc.stdout.strip() == "[]", proc.stderr


@pytest.mark.parametrize("python", [sys.executable, os.path.realpath(sys._base_executable), STATIC_PYTHON], ids=["venv", "shared-libpython", "static-libpython"])
@pytest.mark.parametrize("start", list(STARTS))
def test_host_policy_guards_every_python_whatever_its_flags_and_environment(start, python, tmp_path, app):
    flags, env = STARTS[start]
    argv = ["env", "-i", *(f"{k}={v}" for k, v in env.items()), python, *flags, "app.py", "payload.pkl"]
    control = in_host(tmp_path, argv, preload=False)
    assert control.returncode == 0 and app.exists(), f"control: without the host preload the payload runs: {control.stderr}"
    app.unlink()
    proc = in_host(tmp_path, argv)
    assert proc.returncode != 0 and "PickleDeniedError" in proc.stderr, proc.stdout + proc.stderr
    assert proc.stdout.startswith("user code ran")
    assert not app.exists(), "the payload ran"


def test_host_policy_reaches_a_child_started_with_a_clean_environment(tmp_path, app):
    proc = in_host(tmp_path, ["env", "-i", sys.executable, "-S", "clean_child.py", "payload.pkl"])
    assert "child exit 1" in proc.stdout and "PickleDeniedError" in proc.stderr, proc.stdout + proc.stderr
    assert not app.exists(), "the payload ran in the child"


def test_host_preload_is_invisible_outside_python(tmp_path, app):
    for argv in (["/bin/true"], ["sh", "-c", "echo ok"], ["ls", "app.py"]):
        plain = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True)
        proc = in_host(tmp_path, argv)
        assert (proc.returncode, proc.stdout, proc.stderr) == (plain.returncode, plain.stdout, ""), argv


@pytest.mark.parametrize("mode", [0o666, 0o620], ids=["world-writable", "group-writable"])
def test_a_host_policy_others_can_write_stops_python(mode, tmp_path, app):
    proc = in_host(tmp_path, ["env", "-i", sys.executable, "-S", "app.py", "payload.pkl"], policy_mode=mode)
    assert proc.returncode == 78 and proc.stdout == "", proc.stdout + proc.stderr
    assert "/etc/picklegate/policy.toml is writable by others than root" in proc.stderr, proc.stderr
    assert not app.exists()
    assert in_host(tmp_path, ["/bin/true"], policy_mode=mode).returncode == 0


def test_a_malformed_host_policy_stops_python_even_in_warn(tmp_path, app):
    argv = ["env", "-i", "PICKLEGATE_MODE=warn", sys.executable, "-S", "app.py", "payload.pkl"]
    proc = in_host(tmp_path, argv, policy="version = 1\n[[allow]\n")
    assert proc.returncode == 78 and proc.stdout == "", proc.stdout + proc.stderr
    assert "/etc/picklegate/policy.toml:2:9:" in proc.stderr, proc.stderr
    assert not app.exists()
