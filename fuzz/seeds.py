"""Writes the fuzzers' seed corpus: pickles of every protocol from Python's own pickler and the
hostile corpus's payloads (never run here). Usage: seeds.py SCAN_DIR MANIFEST_DIR."""

import collections
import hashlib
import pathlib
import pickle
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "pytests" / "corpus"))
import payloads  # noqa: E402

scan_dir, manifest_dir = (pathlib.Path(d) for d in sys.argv[1:3])
scan_dir.mkdir(parents=True, exist_ok=True)
manifest_dir.mkdir(parents=True, exist_ok=True)


def put(directory, data):
    (directory / hashlib.sha256(data).hexdigest()[:16]).write_bytes(data)


objects = [None, 1, -(2**70), 1.5, "text", b"bytes", bytearray(b"ba"), [1, [2]], (1,), {"a": {1, 2}},
           frozenset({3}), collections.OrderedDict(a=1), pickle.PickleBuffer(b"buf")]
for proto in range(6):
    for obj in objects:
        try:
            put(scan_dir, pickle.dumps(obj, protocol=proto))
        except pickle.PicklingError:
            pass  # PickleBuffer needs protocol 5
for _, _, _, build in payloads.TECHNIQUES:
    if build is not None:
        put(scan_dir, build("/nonexistent/canary")[:4096])
for example in (ROOT / "policy-examples").glob("*.toml"):
    put(manifest_dir, example.read_bytes())
