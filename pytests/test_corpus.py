"""The hostile corpus (issue 6): every technique in corpus/payloads.py is refused under enforce
with no canary, and its control run without picklegate proves the payload really works."""

import functools
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).with_name("corpus")))
import payloads  # noqa: E402

CHILD = pathlib.Path(__file__).parent / "corpus" / "child.py"
NAMES = [name for name, *_ in payloads.TECHNIQUES]
FAMILIES = sorted({family for _, family, *_ in payloads.TECHNIQUES})


@functools.lru_cache(maxsize=None)
def corpus_run(mode):
    """One child process tries every technique; its JSON report is shared by the tests."""
    workdir = tempfile.mkdtemp(prefix=f"picklegate-corpus-{mode}-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICKLEGATE_")}
    env["PICKLEGATE_LOG"] = str(pathlib.Path(workdir) / "decisions.jsonl")
    proc = subprocess.run([sys.executable, str(CHILD), workdir, mode], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_the_corpus_has_at_least_40_distinct_techniques():
    assert len(NAMES) == len(set(NAMES)) >= 40


@pytest.mark.parametrize("name", NAMES)
def test_technique_is_refused_under_enforce(name):
    result = corpus_run("enforce")[name]
    assert result["canary"] is False, f"{name} ran its payload under enforce: {result}"
    assert result["outcome"] == "PickleDeniedError", result


@pytest.mark.parametrize("name", NAMES)
def test_control_technique_runs_without_picklegate(name):
    assert corpus_run("control")[name]["canary"] is True


def test_every_family_has_techniques():
    assert set(FAMILIES) == {"carrier", "eval", "file", "gadget", "opcode", "reduce", "trust"}
