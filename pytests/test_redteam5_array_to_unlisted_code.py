"""Red team 5 E8: the in-band proof accepts a pickle whose array reaches code the risk table does
not list.

The proof (``Scanner::for_inband_arrays``) keeps a payload out of memory, read from the file after
the check, when it is consumed by ``_frombuffer`` and the pickle imports nothing the risk table
calls ``code``. It says nothing of where the *array* goes, and a global the table does not know is
``unknown``, not ``code``: ``yaml.unsafe_load(bytes(_frombuffer(...)))`` passes. The victim's
approved pickle keeps a YAML document in a byte array; the attacker rewrites the payload after the
check with a YAML ``!!python/object/apply`` tag, and ``os.system`` runs under ``enforce``
(SECURITY.md claimed such a pickle keeps its payloads private). Fixed: the proof admits only
globals the risk table calls `data` and a reviewed list of pandas containers."""

import hashlib
import pickle

import pytest

from conftest import write_manifest

numpy = pytest.importorskip("numpy")
yaml = pytest.importorskip("yaml")

N = 2 << 20
EVIL = b"!!python/object/apply:os.system ['touch CANARY']\n"

CHILD = """
import os, sys, pickle
START, EVIL = int(sys.argv[1]), EVIL_BYTES

def rewrite(event=None):
    with open("victim.pkl", "r+b") as f:   # same inode, same length
        f.seek(START)
        f.write(EVIL)

import picklegate
from picklegate import _core
picklegate.install(policy="pickles.toml", mode="enforce")
_core.set_observer(rewrite)                # right after the decision
with open("victim.pkl", "rb") as f:
    print("loaded", pickle.load(f))
"""


class AsBytes:
    def __init__(self, array):
        self.array = array

    def __reduce__(self):
        return (bytes, (self.array,))


class YamlDocument:
    def __init__(self, array):
        self.array = array

    def __reduce__(self):
        return (yaml.unsafe_load, (AsBytes(self.array),))


def test_array_bytes_rewritten_after_the_check_never_reach_unlisted_code(run_python, tmp_path):
    text = b"threshold: 1\n"
    array = numpy.frombuffer(text + b" " * (N - len(text)), dtype="u1").copy()
    data = pickle.dumps(YamlDocument(array), protocol=5)
    assert pickle.loads(data) == {"threshold": 1}
    start = data.index(b"\x96" + N.to_bytes(8, "little")) + 9
    (tmp_path / "victim.pkl").write_bytes(data)
    write_manifest(tmp_path / "pickles.toml", (hashlib.sha256(data).hexdigest(), "__main__:*"))
    proc = run_python(CHILD.replace("EVIL_BYTES", repr(EVIL)), args=[str(start)])
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "CANARY").exists(), "bytes written after the check ran"
