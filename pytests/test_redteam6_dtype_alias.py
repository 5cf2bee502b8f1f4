"""Red team 6, F4-F6: the in-band proof sizes a dtype from the BUILDs it follows, but a dtype
object can be changed by a BUILD the scan does not follow, before or after ``_frombuffer`` used it.

numpy returns the dtype it is given: ``numpy.dtype(d) is d`` (F4, REDUCE) and
``numpy.dtype.__new__(numpy.dtype, d) is d`` (F5, NEWOBJ); a BUILD on that alias runs
``d.__setstate__`` with a state giving ``d`` a subarray of objects and flags 0. And an array keeps
the very dtype object it was made with, so a BUILD on ``d`` *after* ``_frombuffer(payload, d)``
(the scan follows that one: GET d) turns the finished array's bytes into object pointers (F6).
Every global is ``data`` (``numpy.dtype``, ``_frombuffer``), so the payload was read from the file
after the check: an attacker who rewrites it there gets the address of an object of his choosing
(here one planted in the process, standing for a fake object placed with an address leak) into the
victim's array, and its ``__repr__`` ran under ``enforce``. Fixed in the scanner: ``numpy.dtype`` is
followed only as ``numpy.dtype(code, ...)``, a dtype handed to anything the scan does not follow has
escaped, and the dtypes ``_frombuffer`` used are checked again at the end of the pickle."""

import hashlib
import pickle
import struct

import pytest

from conftest import write_manifest

numpy = pytest.importorskip("numpy")

N = 2 << 20

CHILD = """
import sys, pickle
START = int(sys.argv[1])

class Planted:                 # stands for a fake object at an address the attacker knows
    def __repr__(self):
        open("CANARY", "w").close()
        return "planted"

planted = Planted()

def rewrite(event=None):
    with open("victim.pkl", "r+b") as f:   # same inode, same length
        f.seek(START)
        f.write(id(planted).to_bytes(8, "little"))

import picklegate
from picklegate import _core
picklegate.install(policy="pickles.toml", mode="enforce")
_core.set_observer(rewrite)                # right after the decision
with open("victim.pkl", "rb") as f:
    array = pickle.load(f)
first = array.tobytes()[:8]
if first == id(planted).to_bytes(8, "little"):
    print("loaded", repr(array.ravel()[:1].tolist()))   # the victim looks at its data
else:
    print("loaded the approved bytes" if first == bytes(8) else f"loaded {first!r}")
"""


def s(text):
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def state(subarray=b"N"):
    """A V8 dtype's state (version 3, no names or fields, itemsize 8, flags 0)."""
    return b"(K\x03" + s("|") + subarray + b"NNK\x08K\x08K\x00tb"


# a subarray of one object: memo 0 holds numpy.dtype
OBJECTS = b"(h\x00" + s("O8") + b"\x89\x88\x87RK\x01\x85t"
DTYPE = s("numpy") + s("dtype") + b"\x93\x94" + s("V8") + b"\x89\x88\x87R\x94" + state()  # memo 1: d
ARRAY = (
    s("numpy._core.numeric") + s("_frombuffer") + b"\x93("
    + b"\x96" + N.to_bytes(8, "little") + bytes(N)
    + b"h\x01J" + struct.pack("<i", N // 8) + b"K\x01\x86" + s("C") + b"tR"
)
VARIANTS = {
    "F4 numpy.dtype(d) then BUILD": DTYPE + b"0h\x00h\x01\x85R" + state(OBJECTS) + b"0" + ARRAY,
    "F5 NEWOBJ numpy.dtype(d) then BUILD": DTYPE + b"0h\x00h\x01\x85\x81" + state(OBJECTS) + b"0" + ARRAY,
    "F6 BUILD d after _frombuffer": DTYPE + b"0" + ARRAY + b"h\x01" + state(OBJECTS) + b"0",
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_dtype_changed_where_the_scan_does_not_look(run_python, tmp_path, variant):
    data = b"\x80\x05" + VARIANTS[variant] + b"."
    assert pickle.loads(data).tobytes()[:8] == bytes(8)   # the approved pickle: an array of None objects
    (tmp_path / "victim.pkl").write_bytes(data)
    write_manifest(tmp_path / "pickles.toml", (hashlib.sha256(data).hexdigest(), "__main__:*"))
    start = data.index(b"\x96" + N.to_bytes(8, "little")) + 9
    proc = run_python(CHILD, args=[str(start)])
    assert proc.returncode == 0, proc.stderr
    assert "loaded the approved bytes" in proc.stdout, proc.stdout
    assert not (tmp_path / "CANARY").exists(), "bytes written after the check became an object pointer"


JOBLIB_CHILD = CHILD.replace('"victim.pkl", "r+b"', '"victim.joblib", "r+b"').replace(
    'with open("victim.pkl", "rb") as f:\n    array = pickle.load(f)',
    'import joblib\narray = joblib.load("victim.joblib")[0]',
)


def test_f7_joblib_dtype_changed_after_its_array_was_read(run_python, tmp_path):
    """joblib reads a wrapper's raw bytes (from the file, after the check) at its BUILD, into an
    array that keeps the wrapper's dtype object; a later BUILD on that dtype (GET from the memo)
    gives it an object field with flags 0."""
    import io
    import pickletools

    joblib = pytest.importorskip("joblib")
    n = 1 << 22  # 32 MiB of array bytes: a loader file under 32 MiB is held whole
    joblib.dump([numpy.zeros(n, dtype="V8")], tmp_path / "orig")
    data = (tmp_path / "orig").read_bytes()
    ops = []
    try:
        ops.extend(pickletools.genops(io.BytesIO(data)))
    except ValueError:  # the raw array bytes after the wrapper's BUILD are not opcodes
        pass
    first_reduce = next(i for i, (op, _, _) in enumerate(ops) if op.name == "REDUCE")
    assert ops[first_reduce - 6][1] == "V8" and ops[first_reduce + 1][0].name == "MEMOIZE"
    memo = sum(1 for op, _, _ in ops[:first_reduce] if op.name == "MEMOIZE")
    field = s("a") + s("numpy") + s("dtype") + b"\x93" + s("O8") + b"\x89\x88\x87RK\x00\x86"
    forged = b"h" + bytes([memo]) + b"(K\x03" + s("|") + b"N" + s("a") + b"\x85}" + field + b"sK\x08K\x01K\x00tb0"
    assert data.endswith(b"a.")
    data = data[:-1] + forged + b"."
    assert joblib.load(tmp_path / "orig").__class__ is list
    assert len(data) >= 32 << 20  # else picklegate holds the loader's file whole
    (tmp_path / "victim.joblib").write_bytes(data)
    write_manifest(tmp_path / "pickles.toml", (hashlib.sha256(data).hexdigest(), "__main__:*"))
    start = data.index(bytes(8 * n))
    proc = run_python(JOBLIB_CHILD, args=[str(start)])
    assert proc.returncode == 0, proc.stderr
    assert "loaded the approved bytes" in proc.stdout, proc.stdout
    assert not (tmp_path / "CANARY").exists(), "bytes written after the check became an object pointer"
