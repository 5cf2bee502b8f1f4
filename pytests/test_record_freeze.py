"""Record mode, `picklegate freeze` and `picklegate verify` (issue 4, acceptance 1 and 2): what
an app loads while recording becomes a manifest under which exactly those loads pass."""

import hashlib
import json
import pickle
import subprocess
import sys
import time

DEMO_APP = '''
import collections, fractions, io, pickle, sys
import picklegate

def load_config(path):
    with open(path, "rb") as f:
        return pickle.load(f)

def load_cache(blob):
    return pickle.loads(blob)

def load_model(path):
    with open(path, "rb") as f:
        return pickle.Unpickler(f).load()

def main(mode, policy):
    picklegate.install(policy=policy, mode=mode)
    config = load_config("config.pkl")
    cache = load_cache(open("cache.pkl", "rb").read())
    model = load_model("model.pkl")
    assert config["name"] == "demo" and cache == [1, 2, 3] and model["w"] == fractions.Fraction(1, 3)
    print("three loads ok")
    try:
        load_cache(pickle.dumps(collections.Counter("unseen")))
    except picklegate.PickleDeniedError as error:
        print("unseen denied:", error)

main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
'''


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "picklegate", *args], capture_output=True, text=True, cwd=cwd)


def write_demo_pickles(directory):
    import collections
    import fractions

    (directory / "config.pkl").write_bytes(pickle.dumps({"name": "demo"}, protocol=0))
    (directory / "cache.pkl").write_bytes(pickle.dumps([1, 2, 3], protocol=5))
    model = collections.OrderedDict(w=fractions.Fraction(1, 3))
    (directory / "model.pkl").write_bytes(pickle.dumps(model, protocol=2))
    (directory / "demo_app.py").write_text(DEMO_APP)


def run_demo(directory, *args, env=None):
    return subprocess.run([sys.executable, "demo_app.py", *args], cwd=directory, capture_output=True,
                          text=True, env=env, timeout=120)


def test_record_freeze_enforce_round_trip(tmp_path, monkeypatch):
    write_demo_pickles(tmp_path)
    env = {"PATH": "/usr/bin:/bin", "PICKLEGATE_RECORD": str(tmp_path / "records.jsonl"),
           "PICKLEGATE_LOG": str(tmp_path / "log.jsonl")}
    recorded = run_demo(tmp_path, "record", env=env)
    assert recorded.returncode == 0, recorded.stderr
    assert "three loads ok" in recorded.stdout and "unseen denied" not in recorded.stdout

    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert [r["callsite"] for r in records] == [
        "__main__:load_config", "__main__:load_cache", "__main__:load_model", "__main__:load_cache"]
    config, cache, model, unseen = records
    assert config["sha256"] == hashlib.sha256((tmp_path / "config.pkl").read_bytes()).hexdigest()
    assert config["source"] == str(tmp_path / "config.pkl") and cache["source"] is None
    assert config["size"] == (tmp_path / "config.pkl").stat().st_size
    assert model["globals"] == ["collections.OrderedDict", "fractions.Fraction"]
    assert model["classes"] == ["data", "data"] and model["globals_complete"] is True
    fields = {"time", "pid", "callsite", "sha256", "size", "globals", "globals_complete", "source"}
    assert all(set(r) - {"classes"} == fields for r in records)

    # Freeze only what the first three loads read: the Counter stays unseen.
    (tmp_path / "reviewed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:3]))
    frozen = run_cli("freeze", str(tmp_path / "reviewed.jsonl"), "-o", str(tmp_path / "pickles.toml"))
    assert frozen.returncode == 0, frozen.stderr
    manifest = (tmp_path / "pickles.toml").read_text()
    assert manifest.count("[[allow]]") == 3
    assert '# review: plain data (2 data)\nglobals = [\n    "collections.OrderedDict",  # data\n    "fractions.Fraction",  # data\n]\n' in manifest
    assert manifest.count("globals = []  # the scan found no global") == 2
    assert f"recorded from {tmp_path / 'config.pkl'}" in manifest

    enforced = run_demo(tmp_path, "enforce", str(tmp_path / "pickles.toml"))
    assert enforced.returncode == 0, enforced.stderr
    assert "three loads ok" in enforced.stdout
    assert "unseen denied: picklegate refused" in enforced.stdout and "__main__:load_cache" in enforced.stdout


def test_freeze_is_deterministic_and_merge_keeps_notes(tmp_path):
    lines = [
        {"time": 2.0, "pid": 2, "callsite": "app:b", "sha256": "b" * 64, "size": 3, "globals": ["os.path"], "source": None},
        {"time": 1.0, "pid": 1, "callsite": "app:a", "sha256": "a" * 64, "size": 3, "globals": [], "source": "/d/a.pkl"},
        {"time": 3.0, "pid": 3, "callsite": "app:a", "sha256": "a" * 64, "size": 3, "globals": [], "source": "/d/a.pkl"},
    ]
    (tmp_path / "one.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "two.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(lines)))
    first = run_cli("freeze", str(tmp_path / "one.jsonl"))
    second = run_cli("freeze", str(tmp_path / "two.jsonl"), str(tmp_path / "one.jsonl"))
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert first.stdout.index('callsite = "app:a"') < first.stdout.index('callsite = "app:b"')
    assert first.stdout.count("[[allow]]") == 2

    existing = tmp_path / "existing.toml"
    existing.write_text(f'version = 1\n\n[[allow]]\nsha256 = "{"a" * 64}"\ncallsite = "app:a"\nnote = "reviewed by ana"\n')
    merged = run_cli("freeze", str(tmp_path / "one.jsonl"), "--merge", str(existing))
    assert merged.returncode == 0, merged.stderr
    assert 'note = "reviewed by ana"' in merged.stdout and merged.stdout.count("[[allow]]") == 2


def test_freeze_names_the_bad_line(tmp_path):
    good = {"time": 1.0, "pid": 1, "callsite": "app:a", "sha256": "a" * 64, "size": 3, "globals": [], "source": None}
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps(good) + "\n" + '{"time": 1, "pid": 1, "callsite": "app:a"}\n')
    proc = run_cli("freeze", str(records))
    assert proc.returncode == 1
    assert f"{records}:2: not a picklegate record line" in proc.stderr and "missing field" in proc.stderr


def test_record_mode_without_a_record_file_is_a_policy_error(run_python):
    proc = run_python("""
        import picklegate
        try:
            picklegate.install(mode="record")
        except picklegate.PolicyError as error:
            print("PolicyError:", error)
    """)
    assert "PolicyError: picklegate record mode needs a record file: set PICKLEGATE_RECORD" in proc.stdout, proc.stderr


CONCURRENT_LOADER = '''
import collections, pickle, sys, threading
import picklegate
picklegate.install(mode="record")
worker = int(sys.argv[1])
blobs = [pickle.dumps(collections.OrderedDict(worker=worker, n=n, pad="x" * (n % 700))) for n in range(250)]

def load_all():
    for blob in blobs:
        pickle.loads(blob)

threads = [threading.Thread(target=load_all) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
'''


def test_eight_processes_append_8000_whole_lines(tmp_path):
    (tmp_path / "loader.py").write_text(CONCURRENT_LOADER)
    record = tmp_path / "records.jsonl"
    env = {"PATH": "/usr/bin:/bin", "PICKLEGATE_RECORD": str(record), "PICKLEGATE_LOG": str(tmp_path / "log.jsonl")}
    started = time.monotonic()
    workers = [subprocess.Popen([sys.executable, "loader.py", str(i)], cwd=tmp_path, env=env, stderr=subprocess.PIPE)
               for i in range(8)]
    for worker in workers:
        assert worker.wait(timeout=300) == 0, worker.stderr.read().decode()
    elapsed = time.monotonic() - started
    lines = record.read_text().splitlines()
    assert len(lines) == 8000
    records = [json.loads(line) for line in lines]
    assert all(r["globals"] == ["collections.OrderedDict"] and r["callsite"] == "__main__:load_all" for r in records)
    per_worker = {}
    for r in records:
        per_worker[r["pid"]] = per_worker.get(r["pid"], 0) + 1
    assert sorted(per_worker.values()) == [1000] * 8
    print(f"8 processes x 1000 recorded loads: {elapsed:.2f}s")


def test_verify_lists_and_reports_missing(tmp_path):
    listed = tmp_path / "listed.pkl"
    listed.write_bytes(pickle.dumps([1]))
    unlisted = tmp_path / "unlisted.pkl"
    unlisted.write_bytes(pickle.dumps([2]))
    manifest = tmp_path / "pickles.toml"
    sha = hashlib.sha256(listed.read_bytes()).hexdigest()
    manifest.write_text(f'version = 1\n\n[[allow]]\nsha256 = "{sha}"\ncallsite = "app:load"\n')
    ok = run_cli("verify", str(manifest), str(listed))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "valid, 1 [[allow]] entries" in ok.stdout and f"listed   {listed}" in ok.stdout
    missing = run_cli("verify", str(manifest), str(listed), str(unlisted))
    assert missing.returncode == 1
    assert f"MISSING  {unlisted}" in missing.stdout and "1 of 2 files are not listed" in missing.stdout

    manifest.write_text('version = 1\n[[allow]]\nsha256 = "abc"\ncallsite = "app:load"\n')
    broken = run_cli("verify", str(manifest))
    assert broken.returncode == 1
    assert f"{manifest}:3:10: bad sha256" in broken.stderr


def test_record_mode_from_the_environment_with_no_code_change(run_python, tmp_path):
    """The operator records a deployment's loads with two variables; the app is not changed."""
    record = tmp_path / "loads.jsonl"
    blob = pickle.dumps({"a": 1})
    (tmp_path / "blob.pkl").write_bytes(blob)
    run_python(
        """
        import pickle
        def load_blob():
            with open("blob.pkl", "rb") as f:
                return pickle.load(f)
        print(load_blob())
        """,
        env={"PICKLEGATE_MODE": "record", "PICKLEGATE_RECORD": str(record), "PICKLEGATE_LOG": str(tmp_path / "log")},
        check=True,
    )
    [line] = record.read_text().splitlines()
    entry = json.loads(line)
    assert entry["callsite"] == "__main__:load_blob"
    assert entry["sha256"] == hashlib.sha256(blob).hexdigest()
    assert entry["source"] == str(tmp_path / "blob.pkl")


CONTAINER_APP = """
import sys
import joblib, numpy, torch
import picklegate

picklegate.install(policy=sys.argv[2] if len(sys.argv) > 2 else None, mode=sys.argv[1])

def load_weights():
    return torch.load("weights.pt", weights_only=True)

def load_module():
    return torch.load("module.pt", weights_only=False)

def load_pipeline():
    return joblib.load("pipeline.joblib")

def load_arrays():
    with numpy.load("arrays.npz", allow_pickle=True) as npz:
        return npz["objects"]

assert load_weights()["0.weight"].shape == (2, 3)
assert isinstance(load_module(), torch.nn.Sequential)
assert load_pipeline().predict([[0.0, 1.0]]).shape == (1,)
assert load_arrays()[0].numerator == 1
print("four loads ok")
"""


def test_record_scans_torch_joblib_npz_containers_and_freeze_pins_their_globals(tmp_path):
    import fractions

    import joblib
    import numpy
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    module = torch.nn.Sequential(torch.nn.Linear(3, 2))
    torch.save(module.state_dict(), tmp_path / "weights.pt")
    torch.save(module, tmp_path / "module.pt")
    joblib.dump(make_pipeline(StandardScaler(), LogisticRegression()).fit([[0, 0], [1, 1]], [0, 1]), tmp_path / "pipeline.joblib")
    numpy.savez(tmp_path / "arrays.npz", numbers=numpy.arange(3), objects=numpy.array([fractions.Fraction(1, 3)], dtype=object))
    (tmp_path / "container_app.py").write_text(CONTAINER_APP)
    env = {"PATH": "/usr/bin:/bin", "PICKLEGATE_RECORD": str(tmp_path / "records.jsonl")}

    def run(*args):
        return subprocess.run([sys.executable, "container_app.py", *args], cwd=tmp_path, capture_output=True, text=True,
                              env=env, timeout=300)

    recorded = run("record")
    assert recorded.returncode == 0 and "four loads ok" in recorded.stdout, recorded.stderr
    records = {r["callsite"].split(":")[1]: r for r in map(json.loads, (tmp_path / "records.jsonl").read_text().splitlines())}
    assert set(records) == {"load_weights", "load_module", "load_pipeline", "load_arrays"}
    for name, record in records.items():
        assert record["globals_complete"] is True and record["globals"], (name, record)
    assert "torch._utils._rebuild_tensor_v2" in records["load_weights"]["globals"]
    assert "torch.nn.modules.linear.Linear" in records["load_module"]["globals"]
    assert "sklearn.linear_model._logistic.LogisticRegression" in records["load_pipeline"]["globals"]
    assert "fractions.Fraction" in records["load_arrays"]["globals"]
    classes = dict(zip(records["load_module"]["globals"], records["load_module"]["classes"]))
    assert classes["torch.nn.modules.linear.Linear"] == "unknown" and classes["collections.OrderedDict"] == "data"

    frozen = run_cli("freeze", str(tmp_path / "records.jsonl"), "-o", str(tmp_path / "pickles.toml"))
    assert frozen.returncode == 0, frozen.stderr
    manifest = (tmp_path / "pickles.toml").read_text()
    assert manifest.count("# review: needs a human") == 2 and manifest.count("# review: plain data") == 2
    assert '    "torch.nn.modules.linear.Linear",  # unknown\n' in manifest
    assert "globals = []" not in manifest and "not pinned" not in manifest
    # the pinned globals are exactly what the loads resolve: they run unchanged under enforce
    enforced = run("enforce", str(tmp_path / "pickles.toml"))
    assert enforced.returncode == 0 and "four loads ok" in enforced.stdout, enforced.stderr


CANARY_APP = """
import pickle, sys
import picklegate

picklegate.install(policy=sys.argv[1], mode="enforce")
try:
    pickle.loads(open("payload.pkl", "rb").read())
    print("loaded")
except picklegate.PickleDeniedError as error:
    print("denied:", error)
"""


def test_globals_empty_admits_no_global_and_no_key_admits_any(tmp_path):
    canary = tmp_path / "canary"
    payload = f"cposix\nsystem\n(S'touch {canary}'\ntR.".encode()
    (tmp_path / "payload.pkl").write_bytes(payload)
    (tmp_path / "app.py").write_text(CANARY_APP)
    entry = f'version = 1\n[[allow]]\nsha256 = "{hashlib.sha256(payload).hexdigest()}"\ncallsite = "__main__:<module>"\n'
    (tmp_path / "none.toml").write_text(entry + "globals = []\n")
    (tmp_path / "any.toml").write_text(entry)

    def run(policy):
        return subprocess.run([sys.executable, "app.py", policy], cwd=tmp_path, capture_output=True, text=True, timeout=60)

    refused = run("none.toml")
    assert "denied:" in refused.stdout and "posix.system" in refused.stdout, refused
    assert "not in the globals list" in refused.stdout and "`globals = []` admits no global" in refused.stdout
    assert not canary.exists(), "globals = [] let a global through"
    # control: the same entry without the key admits whatever the reviewed bytes resolve
    admitted = run("any.toml")
    assert "loaded" in admitted.stdout, admitted
    assert canary.exists()
