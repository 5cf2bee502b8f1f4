"""A listed pickle loads only at its callsite and only byte-for-byte (issue 2, acceptance 3)."""

import hashlib
import json

from conftest import write_manifest

CHILD = """
import json, pickle, sys
import picklegate

def load_model(data):
    return pickle.loads(data)

def somewhere_else(data):
    return pickle.loads(data)

picklegate.install(policy="pickles.toml")
data = open("payload.pkl", "rb").read()
if sys.argv[1] == "flip":
    data = bytearray(data)
    data[-2] ^= 1
    data = bytes(data)
loader = {"right": load_model, "wrong": somewhere_else, "flip": load_model}[sys.argv[1]]
try:
    loader(data)
except picklegate.PickleDeniedError as error:
    print(json.dumps({"denied": str(error), "callsite": error.callsite, "sha256": error.sha256, "size": error.size}))
    sys.exit(3)
print(json.dumps({"loaded": True}))
"""


def setup(tmp_path, canary):
    path, payload = canary
    (tmp_path / "payload.pkl").write_bytes(payload)
    write_manifest(tmp_path / "pickles.toml", (hashlib.sha256(payload).hexdigest(), "__main__:load_model"))
    return path, payload


def test_listed_payload_runs_at_its_callsite(canary, run_python, tmp_path):
    path, _ = setup(tmp_path, canary)
    proc = run_python(CHILD, args=["right"])
    assert proc.returncode == 0, proc.stderr
    assert path.exists(), "an allowed pickle must really be unpickled"


def test_listed_payload_is_refused_at_another_callsite(canary, run_python, tmp_path):
    path, payload = setup(tmp_path, canary)
    proc = run_python(CHILD, args=["wrong"])
    assert proc.returncode == 3, proc.stderr
    report = json.loads(proc.stdout)
    assert report["callsite"] == "__main__:somewhere_else"
    assert report["sha256"] == hashlib.sha256(payload).hexdigest()
    assert report["size"] == len(payload)
    assert "only for callsite(s) __main__:load_model" in report["denied"]
    # The message carries the exact entry that would allow it.
    assert f'sha256 = "{report["sha256"]}"\ncallsite = "__main__:somewhere_else"' in report["denied"]
    assert not path.exists()


def test_one_flipped_byte_is_refused(canary, run_python, tmp_path):
    path, _ = setup(tmp_path, canary)
    proc = run_python(CHILD, args=["flip"])
    assert proc.returncode == 3, proc.stderr
    assert "not in the manifest" in json.loads(proc.stdout)["denied"]
    assert not path.exists()


def test_callsite_skips_loader_libraries_and_uses_qualname(run_python, tmp_path):
    proc = run_python(
        """
        import pickle, picklegate
        class Service:
            def restore(self, data):
                return pickle.loads(data)
        picklegate.install()
        try:
            Service().restore(pickle.dumps(1))
        except picklegate.PickleDeniedError as error:
            print(error.callsite)
        """,
        check=True,
    )
    assert proc.stdout.strip() == "__main__:Service.restore"


def test_file_loads_hash_the_whole_file_and_leave_the_position_after_the_pickle(run_python, tmp_path):
    """Two pickles in one file: the first load hashes the whole rest of the file, as sha256sum
    does for a one-pickle file, and the file stays positioned for the next load."""
    import pickle

    first, second = pickle.dumps("first"), pickle.dumps("second")
    (tmp_path / "two.pkl").write_bytes(first + second)
    write_manifest(
        tmp_path / "pickles.toml",
        (hashlib.sha256(first + second).hexdigest(), "__main__:*"),
        (hashlib.sha256(second).hexdigest(), "__main__:*"),
    )
    proc = run_python(
        """
        import pickle, picklegate
        picklegate.install(policy="pickles.toml")
        with open("two.pkl", "rb") as f:
            print(pickle.load(f), pickle.Unpickler(f).load())
            try:
                pickle.load(f)
            except EOFError:
                print("EOF")
        """,
        check=True,
    )
    assert proc.stdout.split() == ["first", "second", "EOF"]


def test_in_memory_stream_is_judged_from_its_position_and_left_writable(run_python, tmp_path):
    """An io.BytesIO is judged on its own buffer from its position on (not a copy of it); after
    the load it is positioned past the pickle and can be written to again."""
    import pickle

    first, second = pickle.dumps("first"), pickle.dumps("second")
    write_manifest(
        tmp_path / "pickles.toml",
        (hashlib.sha256(first + second).hexdigest(), "__main__:*"),
        (hashlib.sha256(second).hexdigest(), "__main__:*"),
    )
    proc = run_python(
        f"""
        import io, pickle, picklegate
        picklegate.install(policy="pickles.toml")
        stream = io.BytesIO({first + second!r})
        unpickler = pickle.Unpickler(stream)
        print(pickle.load(stream), unpickler.load(), stream.tell() == {len(first + second)})
        stream.write(b"more")  # no export of its buffer outlives the loads
        print(len(stream.getvalue()))
        """,
        check=True,
    )
    assert proc.stdout.split() == ["first", "second", "True", str(len(first + second) + 4)]


def test_stream_that_cannot_seek_is_read_exactly(run_python, tmp_path):
    """A pipe: picklegate reads exactly one pickle (no over-read) and hashes those bytes."""
    import pickle

    message = pickle.dumps({"n": 1}, protocol=4)
    write_manifest(tmp_path / "pickles.toml", (hashlib.sha256(message).hexdigest(), "__main__:receive"))
    proc = run_python(
        f"""
        import os, pickle, picklegate
        picklegate.install(policy="pickles.toml")
        r, w = os.pipe()
        os.write(w, {message!r} + b"TRAILER")
        reader = os.fdopen(r, "rb", buffering=0)
        def receive():
            return pickle.load(reader)
        print(receive(), reader.read(7))
        """,
        check=True,
    )
    assert proc.stdout.strip() == "{'n': 1} b'TRAILER'"


def test_warn_mode_runs_and_logs_one_json_line(canary, run_python, tmp_path):
    path, payload = canary
    (tmp_path / "payload.pkl").write_bytes(payload)
    log = tmp_path / "decisions.jsonl"
    proc = run_python(
        """
        import logging, pickle, picklegate
        seen = []
        logging.getLogger("picklegate").addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: seen.append(r.getMessage())})())
        picklegate.install(mode="warn")
        pickle.loads(open("payload.pkl", "rb").read())
        print(len(seen), seen[0] if seen else "")
        """,
        env={"PICKLEGATE_LOG": str(log)},
        check=True,
    )
    assert path.exists(), "warn mode must let the load run"
    lines = log.read_text().splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["decision"] == "warn" and event["mode"] == "warn"
    assert event["callsite"] == "__main__:<module>"
    assert event["sha256"] == hashlib.sha256(payload).hexdigest()
    assert event["globals"] == ["posix.system"]
    assert {"time", "pid", "size", "source", "reason"} <= set(event)
    count, forwarded = proc.stdout.split(" ", 1)
    assert count == "1" and json.loads(forwarded) == event


def test_off_mode_runs_everything_silently(canary, run_python, tmp_path):
    path, payload = canary
    (tmp_path / "payload.pkl").write_bytes(payload)
    proc = run_python(
        """
        import pickle, picklegate
        picklegate.install(mode="off")
        pickle.loads(open("payload.pkl", "rb").read())
        """,
        check=True,
    )
    assert path.exists() and proc.stderr == ""


def test_denial_logs_to_stderr_by_default(run_python):
    proc = run_python(
        """
        import pickle, picklegate
        picklegate.install()
        try:
            pickle.loads(pickle.dumps(1))
        except picklegate.PickleDeniedError:
            pass
        """,
        check=True,
    )
    event = json.loads(proc.stderr.strip())
    assert event["decision"] == "deny" and event["mode"] == "enforce"


def test_unknown_mode_is_a_policy_error(run_python):
    proc = run_python(
        """
        import picklegate
        try:
            picklegate.install(mode="strict")
        except picklegate.PolicyError as error:
            print(error)
        """,
        check=True,
    )
    assert 'unknown picklegate mode "strict"' in proc.stdout


def test_code_cannot_loosen_what_is_installed(canary, run_python, tmp_path):
    path, payload = canary
    (tmp_path / "payload.pkl").write_bytes(payload)
    proc = run_python(
        """
        import pickle, picklegate
        picklegate.install(mode="enforce")
        picklegate.install(mode="off")          # a library trying to switch it off
        print(picklegate.state())
        try:
            pickle.loads(open("payload.pkl", "rb").read())
        except picklegate.PickleDeniedError:
            print("DENIED")
        """,
        check=True,
    )
    assert "('enforce', None, 'code')" in proc.stdout and "DENIED" in proc.stdout
    assert "ignored" in proc.stderr
    assert not path.exists()
