"""A real dask.distributed LocalCluster (processes, 2 workers) runs under enforce with the
trust rules of policy-examples/dask.toml; a malicious task argument is refused on the worker."""

import json
import pathlib

import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "policy-examples" / "dask.toml"

TASKS = """
import os

def inc(x):
    return x + 1

class Evil:
    def __reduce__(self):
        return (os.system, ("touch CANARY",))

    def __dask_tokenize__(self):   # so the client never unpickles it: the cluster must refuse it
        return "evil"

def pid(_=None):
    return os.getpid()
"""

APP = """
import os
from distributed import Client, LocalCluster
from myapp import tasks

if __name__ == "__main__":
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
        print("one", client.submit(tasks.inc, 1).result())
        print("map", sum(client.gather(client.map(tasks.inc, range(10)))))
        print("workers", " ".join(map(str, sorted(set(client.gather(client.map(tasks.pid, range(8))))))))
        try:
            [data] = client.scatter([tasks.Evil()], hash=False)   # sent straight to a worker
            client.submit(tasks.inc, data).result()
            print("scatter ran")
        except Exception as error:
            print("scatter-refused", "PickleDeniedError" in str(error) and "posix.system" in str(error))
        try:
            client.submit(tasks.inc, tasks.Evil(), pure=False).result()  # inside the task graph
            print("submit ran")
        except Exception as error:
            print("submit-refused", type(error).__name__)
        print("next", client.submit(tasks.inc, 41).result())
    print("canary", os.path.exists("CANARY"))
"""


def test_dask_cluster_runs_under_enforce_and_refuses_a_malicious_argument(run_python, tmp_path):
    try:
        import distributed  # noqa: F401
    except ImportError:
        pytest.fail("dask[distributed] is not installed: run `bash scripts/test`")
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "tasks.py").write_text(TASKS)
    log = tmp_path / "decisions.jsonl"
    proc = run_python(
        APP,
        env={"PICKLEGATE_POLICY": str(EXAMPLE), "PICKLEGATE_MODE": "enforce", "PICKLEGATE_LOG": str(log), "PYTHONPATH": str(tmp_path),
             # as the example says: with spawn, the nanny needs builtins.getattr, a gadget
             "DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD": "fork"},
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert lines["one"] == "2"
    assert lines["map"] == "55"
    assert lines["scatter-refused"] == "True", lines
    assert "submit-refused" in lines, lines
    assert lines["next"] == "42"
    assert lines["canary"] == "False"
    assert not (tmp_path / "CANARY").exists()
    # A worker process refused the scattered payload, at dask's transport callsite.
    workers = {int(pid) for pid in lines["workers"].split()}
    denials = [json.loads(line) for line in log.read_text().splitlines() if '"deny"' in line]
    assert any(d["pid"] in workers and d["callsite"] == "distributed.protocol.pickle:loads"
               and d["globals"] == ["posix.system"] for d in denials), denials
