"""Concurrency (issue 6): 16 threads x 10,000 loads mixing allowed, denied and token-scoped
loads, then 4 forked processes doing the same: every decision right, one intact log line each."""

import json
import os
import pathlib
import subprocess
import sys

CHILD = pathlib.Path(__file__).parent / "corpus" / "stress_child.py"


def stress(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICKLEGATE_")}
    env["PICKLEGATE_LOG"] = str(tmp_path / "decisions.jsonl")
    proc = subprocess.run([sys.executable, str(CHILD), str(tmp_path), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    lines = (tmp_path / "decisions.jsonl").read_text().splitlines()
    return report, [json.loads(line) for line in lines]


def test_16_threads_of_10000_loads_decide_every_load_right(tmp_path):
    report, log = stress(tmp_path, 16, 10_000)
    assert report["loads"] == 160_000
    assert (report["wrong"], report["sample"], report["canary"]) == (0, [], False)
    assert len(log) == report["denials"] > 100_000
    assert {entry["decision"] for entry in log} == {"deny"}


def test_4_processes_of_4_threads_decide_every_load_right(tmp_path):
    report, log = stress(tmp_path, 4, 10_000, 4)
    assert report["loads"] == 160_000
    assert (report["wrong"], report["sample"], report["canary"]) == (0, [], False)
    assert len(log) == report["denials"] > 100_000
    assert len({entry["pid"] for entry in log}) == 4
