"""Code inside the process tries to switch picklegate off after install (issue 6): restored
originals, reloads, direct _pickle calls, subclasses, forged and stolen tokens, install(off)."""

import functools
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import pytest

CHILD = pathlib.Path(__file__).parent / "corpus" / "tamper_child.py"
ATTEMPTS = {
    "restore-saved-originals": "PickleDeniedError",
    "restored-pure-python-load": "PickleDeniedError",
    "importlib-reload-pickle": "PickleDeniedError",
    "reloaded-pure-python-unpickler": "PickleDeniedError",
    "del-sys-modules-and-reimport": "PickleDeniedError",
    "reimported-pure-python-loads": "PickleDeniedError",
    "call-pickle-c-module-directly": "PickleDeniedError",
    "original-c-unpickler-class": "PickleDeniedError",
    "picklegates-own-saved-original": "PickleDeniedError",
    "replace-the-decision-function": "PickleDeniedError",
    "subclass-overriding-find-class": "PickleDeniedError",
    "subclass-of-c-unpickler-overriding-find-class": "PickleDeniedError",
    "forge-a-token": "BadTokenError",
    "copy-or-pickle-a-token": "TypeError",
    "reuse-a-token-after-its-block": "BadTokenError",
    "steal-a-token-across-threads": "BadTokenError",
    "steal-a-token-across-asyncio-tasks": "BadTokenError",
    "library-calls-install-off": "PickleDeniedError",
}


@functools.lru_cache(maxsize=None)
def tamper_report():
    workdir = tempfile.mkdtemp(prefix="picklegate-tamper-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICKLEGATE_")}
    env["PICKLEGATE_LOG"] = os.path.join(workdir, "decisions.jsonl")
    proc = subprocess.run([sys.executable, str(CHILD), workdir], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("attempt", sorted(ATTEMPTS))
def test_tamper_attempt_is_refused(attempt):
    result = tamper_report()[attempt]
    assert result == {"outcome": ATTEMPTS[attempt], "canary": False}


def test_a_find_class_override_is_decided_by_hash_not_by_the_backstop():
    assert tamper_report()["subclass-loads-listed-pickle"]["outcome"] == "{'ok': [1, 2]}"


def test_the_guard_still_stands_after_every_attempt():
    assert tamper_report()["benign-still-loads"]["outcome"] == "{'ok': [1, 2]}"
