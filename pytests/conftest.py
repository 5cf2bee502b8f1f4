"""Shared helpers: every behaviour test runs a real Python process with picklegate installed,
and malicious payloads prove their refusal with a canary file that must never appear."""

import os
import pickle
import subprocess
import sys
import textwrap

import pytest

pytest_plugins = ["pytester"]


class Canary:
    """A payload whose unpickling runs ``touch <path>``: the file exists only if it ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.fixture
def canary(tmp_path):
    path = tmp_path / "CANARY"
    payload = pickle.dumps(Canary(path))
    yield path, payload
    # Nothing may leave a canary behind, whatever the test asserted.


@pytest.fixture
def run_python(tmp_path):
    """Runs ``code`` in a fresh interpreter (cwd = tmp_path); returns the CompletedProcess."""

    def run(code, env=None, args=(), check=False, timeout=120):
        script = tmp_path / f"script_{len(list(tmp_path.glob('script_*.py')))}.py"
        script.write_text(textwrap.dedent(code))
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("PICKLEGATE_")}
        full_env.update(env or {})
        proc = subprocess.run(
            [sys.executable, str(script), *args],
            cwd=tmp_path,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
        return proc

    return run


def write_manifest(path, *entries, trust=(), header="version = 1\n"):
    """Writes a manifest: ``entries`` are (sha256, callsite) pairs, ``trust`` (callsite, globals)."""
    text = header
    for sha, callsite in entries:
        text += f'\n[[allow]]\nsha256 = "{sha}"\ncallsite = "{callsite}"\n'
    for callsite, globals_ in trust:
        text += f"\n[[trust]]\ncallsite = \"{callsite}\"\nglobals = {list(globals_)!r}\n".replace("'", '"')
    path.write_text(text)
    return path
