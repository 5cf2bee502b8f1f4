"""PICKLEGATE_* variables alone guard a script from its first line (here, in a fresh venv, in children),
and a policy that cannot be used stops the process under enforce (issue 3, acceptance 2 and 5)."""

import os
import pickle
import subprocess
import sys

import pytest


APP = """
import pickle, sys
print("user code ran")
pickle.loads(open(sys.argv[1], "rb").read())
print("LOADED")
"""


@pytest.fixture
def app(tmp_path, canary):
    """A script with no picklegate in it that unpickles the canary payload it is given."""
    path, payload = canary
    (tmp_path / "payload.pkl").write_bytes(payload)
    script = tmp_path / "app.py"
    script.write_text(APP)
    return script, tmp_path / "payload.pkl", path


def run(argv, env, cwd):
    full = {k: v for k, v in os.environ.items() if not k.startswith("PICKLEGATE_")}
    full.update(env)
    return subprocess.run(argv, env=full, cwd=cwd, capture_output=True, text=True, timeout=120)


def assert_stopped(proc, canary):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "PickleDeniedError" in proc.stderr, proc.stderr
    assert "LOADED" not in proc.stdout
    assert not canary.exists(), "the payload ran"


def test_env_vars_alone_guard_a_script(app, tmp_path):
    script, payload, canary = app
    proc = run([sys.executable, str(script), str(payload)], {"PICKLEGATE_MODE": "enforce"}, tmp_path)
    assert proc.stdout.startswith("user code ran")
    assert_stopped(proc, canary)


def test_subprocess_children_inherit_the_guard(app, tmp_path):
    script, payload, canary = app
    parent = f"import subprocess, sys; sys.exit(subprocess.run([sys.executable, {str(script)!r}, {str(payload)!r}]).returncode)"
    proc = run([sys.executable, "-c", parent], {"PICKLEGATE_MODE": "enforce"}, tmp_path)
    assert_stopped(proc, canary)


def test_without_env_vars_nothing_is_imported(run_python):
    proc = run_python("import sys; print('picklegate' in sys.modules, '_pickle' in sys.modules)", check=True)
    assert proc.stdout.split() == ["False", "False"]


def test_activation_happens_before_the_first_line(run_python, tmp_path):
    policy = tmp_path / "p.toml"
    policy.write_text("version = 1\n")
    proc = run_python(
        "import sys; print(sys.modules['picklegate'].state())",
        env={"PICKLEGATE_POLICY": str(policy)},
        check=True,
    )
    assert proc.stdout.strip() == repr(("enforce", str(policy), "environment"))


def test_code_cannot_loosen_the_environment(run_python, tmp_path):
    proc = run_python(
        "import picklegate; picklegate.install(mode='off'); print(picklegate.state()[0])",
        env={"PICKLEGATE_MODE": "enforce"},
        check=True,
    )
    assert proc.stdout.strip() == "enforce"


@pytest.fixture(scope="session")
def wheel(tmp_path_factory):
    """The wheel of this checkout, built once (cargo's cache makes it quick after pip install .);
    scripts/test-pythons builds it once for every interpreter and names it in PICKLEGATE_TEST_WHEEL."""
    if os.environ.get("PICKLEGATE_TEST_WHEEL"):
        return os.environ["PICKLEGATE_TEST_WHEEL"]
    out = tmp_path_factory.mktemp("wheel")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "maturin", "build", "--release", "--out", str(out)],
        cwd=repo, capture_output=True, text=True,
    )
    assert proc.returncode == 0, "maturin build failed (pip install '.[test]' installs maturin):\n" + proc.stderr[-3000:]
    (built,) = out.glob("*.whl")
    return built


def test_fresh_venv_with_the_wheel_is_guarded(wheel, app, tmp_path):
    script, payload, canary = app
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", str(wheel)], check=True)
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], capture_output=True, text=True, check=True)
    assert os.path.exists(os.path.join(purelib.stdout.strip(), "00-picklegate.pth")), "the wheel did not install the start-up hook"
    proc = run([python, str(script), str(payload)], {"PICKLEGATE_MODE": "enforce"}, tmp_path)
    assert_stopped(proc, canary)
    control = run([python, str(script), str(payload)], {}, tmp_path)
    assert control.returncode == 0 and canary.exists(), "control: unguarded, the payload must run"


MALFORMED = "version = 1\n[[allow]\n"


def test_malformed_policy_stops_enforce_before_user_code(run_python, tmp_path):
    policy = tmp_path / "bad.toml"
    policy.write_text(MALFORMED)
    proc = run_python("print('user code ran')", env={"PICKLEGATE_POLICY": str(policy)})
    assert proc.returncode == 78
    assert "user code ran" not in proc.stdout
    assert f"{policy}:2:9:" in proc.stderr, proc.stderr
    assert "stopping, rather than run unguarded" in proc.stderr


def test_malformed_policy_under_warn_runs_and_says_so(run_python, tmp_path, canary):
    path, payload = canary
    policy = tmp_path / "bad.toml"
    policy.write_text(MALFORMED)
    proc = run_python(
        f"import pickle; print('user code ran'); pickle.loads({pickle.dumps([1, 2])!r})",
        env={"PICKLEGATE_POLICY": str(policy), "PICKLEGATE_MODE": "warn"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "user code ran"
    assert f"WARNING: {policy}:2:9:" in proc.stderr
    assert "the policy is not in force" in proc.stderr
    assert '"decision":"warn"' in proc.stderr  # every load is still logged


@pytest.mark.parametrize(
    "env, message",
    [
        ({"PICKLEGATE_POLICY": "missing.toml"}, "missing.toml: cannot read the pickle manifest"),
        ({"PICKLEGATE_MODE": "enforse"}, 'unknown picklegate mode "enforse"'),
        ({"PICKLEGATE_MODE": "enforce", "PICKLEGATE_LOG": "/nonexistent/dir/log.jsonl"}, "/nonexistent/dir/log.jsonl"),
    ],
)
def test_unusable_settings_stop_the_process(env, message, run_python):
    proc = run_python("print('user code ran')", env=env)
    assert proc.returncode == 78, proc.stderr
    assert proc.stdout == ""
    assert message in proc.stderr, proc.stderr
