"""`picklegate run` and programs glibc runs in secure-execution mode (set-user-ID, set-group-ID,
file capabilities), where LD_PRELOAD is ignored: refused under enforce, said under warn/--no-preload."""

import os
import pickle
import shutil
import stat
import struct
import subprocess
import sys

import pytest
from test_preload_embedded import Touch

SECURITY_CAPABILITY = "security.capability"


def picklegate_run(*args, cwd, path=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICKLEGATE_") and k != "LD_PRELOAD"}
    if path is not None:
        env["PATH"] = f"{path}{os.pathsep}{env.get('PATH', os.defpath)}"
    return subprocess.run([sys.executable, "-m", "picklegate", "run", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def copy_of(program, directory, name, mode):
    """A copy of `program` owned by the current user; chmod keeps the set-ID bits for the owner."""
    directory.mkdir(exist_ok=True)
    copy = directory / name
    shutil.copy(program, copy)
    copy.chmod(mode)
    assert copy.stat().st_mode & 0o7777 == mode
    return copy


def python_payload(tmp_path):
    canary = tmp_path / "canary"
    payload = pickle.dumps(Touch(canary))
    return canary, f"import pickle; pickle.loads(bytes.fromhex('{payload.hex()}')); print('LOADED')"


def script(path, first_line):
    path.write_text(f"{first_line}\nprint('script ran')\n")
    path.chmod(0o755)
    return path


def test_enforce_refuses_a_setuid_program_naming_it(tmp_path):
    python = copy_of(os.path.realpath(sys._base_executable), tmp_path / "bin", "python-setuid", 0o4755)
    canary, code = python_payload(tmp_path)
    proc = picklegate_run("--mode", "enforce", "--", str(python), "-S", "-c", code, cwd=tmp_path)
    assert proc.returncode == 78, proc.stdout + proc.stderr
    assert f"refusing to run {python}: it is set-user-ID" in proc.stderr
    assert "LD_PRELOAD is ignored" in proc.stderr and "--no-preload" in proc.stderr
    assert "LOADED" not in proc.stdout and not canary.exists()


def test_enforce_refuses_a_setgid_program_found_on_path(tmp_path):
    true = copy_of(shutil.which("true"), tmp_path / "bin", "true-setgid", 0o2755)
    proc = picklegate_run("--policy", os.devnull, "--", "true-setgid", cwd=tmp_path, path=true.parent)
    assert proc.returncode == 78, proc.stderr
    assert f"refusing to run {true}: it is set-group-ID" in proc.stderr


@pytest.mark.parametrize("how", ["interpreter", "env", "script-of-a-script"])
def test_enforce_refuses_a_script_whose_interpreter_is_setuid(tmp_path, how):
    python = copy_of(os.path.realpath(sys._base_executable), tmp_path / "bin", "python-setuid", 0o4755)
    first = {"interpreter": f"#!{python} -S", "env": "#!/usr/bin/env python-setuid",
             "script-of-a-script": f"#!{script(tmp_path / 'wrapper', f'#!{python}')}"}[how]
    app = script(tmp_path / "app", first)
    proc = picklegate_run("--mode", "enforce", "--", str(app), cwd=tmp_path, path=python.parent)
    assert proc.returncode == 78, proc.stdout + proc.stderr
    assert f"refusing to run {python} (the interpreter of " in proc.stderr and "set-user-ID" in proc.stderr
    assert "script ran" not in proc.stdout


def test_warn_and_record_say_so_and_run(tmp_path):
    true = copy_of(shutil.which("true"), tmp_path / "bin", "true-setuid", 0o4755)
    for mode in ("warn", "record"):
        proc = picklegate_run("--mode", mode, "--", str(true), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert f"warning: {true}: it is set-user-ID" in proc.stderr and "runs unguarded" in proc.stderr


def test_no_preload_runs_and_says_the_preload_is_off_anyway(tmp_path):
    true = copy_of(shutil.which("true"), tmp_path / "bin", "true-setuid", 0o4755)
    proc = picklegate_run("--mode", "enforce", "--no-preload", "--", str(true), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"note: {true}: it is set-user-ID" in proc.stderr and "the preload is off anyway" in proc.stderr


def test_ordinary_programs_and_scripts_run_without_a_word(tmp_path):
    true = copy_of(shutil.which("true"), tmp_path / "bin", "true", 0o755)
    # set-group-ID without group-execute is the mandatory-locking mark, not set-group-ID execution.
    locked = copy_of(shutil.which("true"), tmp_path / "bin", "true-locked", 0o2745)
    app = script(tmp_path / "app", f"#!{os.path.realpath(sys._base_executable)} -S")
    for command in (str(true), str(locked), str(app)):
        proc = picklegate_run("--mode", "enforce", "--", command, cwd=tmp_path)
        assert proc.returncode == 0 and proc.stderr == "", (command, proc.stderr)


def test_enforce_refuses_a_program_with_file_capabilities(tmp_path):
    true = copy_of(shutil.which("true"), tmp_path / "bin", "true-cap", 0o755)
    # struct vfs_cap_data, revision 2: CAP_NET_BIND_SERVICE (10) permitted, not effective.
    capability = struct.pack("<5I", 0x02000000, 1 << 10, 0, 0, 0)
    try:
        os.setxattr(true, SECURITY_CAPABILITY, capability)
    except (OSError, AttributeError) as error:
        pytest.skip(f"cannot give a file capabilities here (needs CAP_SETFCAP and xattrs): {error}")
    proc = picklegate_run("--mode", "enforce", "--", str(true), cwd=tmp_path)
    assert proc.returncode == 78, proc.stderr
    assert f"refusing to run {true}: it has file capabilities" in proc.stderr
    assert not true.stat().st_mode & (stat.S_ISUID | stat.S_ISGID)
