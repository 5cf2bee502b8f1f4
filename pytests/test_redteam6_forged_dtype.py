"""Red team 6, F1-F3: a dtype whose pickled flags deny the objects it holds makes numpy read raw
bytes as object pointers, and those bytes were read from the file after the check.

numpy's ``dtype.__setstate__`` takes the flags as given, and ``frombuffer`` (hence the in-band
reducer ``_frombuffer``) and joblib's array reader check only the flags: a ``V8`` whose state gives
it a subarray of objects (F1), a structured dtype with an object field (F2) or an ``O8`` (F3), each
with flags 0, turns array bytes into ``PyObject*``. The approved pickles import only ``data``
globals (``numpy.dtype``, ``_frombuffer``, joblib's wrapper) and their payload is zeros (``None``).
The attacker rewrites the payload after the check with the address of an object (here one planted
in the process, standing for a fake object placed with an address leak): the victim's array then
holds it, and its ``__repr__`` ran (canary) under ``enforce``. Fixed in the scanner
(``Dtype::element``): objects in the code, subarray or fields with flags that deny them are not a
size the scan accepts, so the in-band plan is dropped and a joblib file is kept whole."""

import hashlib
import pickle

import pytest

from conftest import write_manifest

numpy = pytest.importorskip("numpy")

CHILD = """
import sys, pickle
START, LOADER = int(sys.argv[1]), sys.argv[2]

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
if LOADER == "pickle":
    with open("victim.pkl", "rb") as f:
        array = pickle.load(f)["weights"]
else:
    import joblib
    array = joblib.load("victim.pkl")["w"]
first = array.tobytes()[:8]
if first == id(planted).to_bytes(8, "little"):
    print("loaded", repr(array.ravel()[:1].tolist()))   # the victim looks at its data
else:
    print("loaded the approved bytes" if first == bytes(8) else f"loaded {first!r}")
"""


def _forged(code, state):
    dtype = numpy.dtype(code)
    dtype.__setstate__(state)
    return dtype


def _approve(tmp_path, data):
    (tmp_path / "victim.pkl").write_bytes(data)
    write_manifest(tmp_path / "pickles.toml", (hashlib.sha256(data).hexdigest(), "__main__:*"))


def _assert_not_run(proc, tmp_path):
    assert proc.returncode == 0, proc.stderr
    assert "loaded the approved bytes" in proc.stdout, proc.stdout
    assert not (tmp_path / "CANARY").exists(), "bytes written after the check became an object pointer"


class InBand:
    """``_frombuffer(bytearray payload, dtype, shape, 'C')`` as numpy pickles an array in-band."""

    def __init__(self, n, dtype):
        self.n, self.dtype = n, dtype

    def __reduce__(self):
        from numpy._core.numeric import _frombuffer

        return (_frombuffer, (bytearray(self.n), self.dtype, (self.n // 8, 1), "C"))


@pytest.mark.parametrize("part", ["subarray", "field"])
def test_f1_in_band_objects_with_flags_zero(run_python, tmp_path, part):
    n = 2 << 20
    objects = numpy.dtype("O")
    if part == "subarray":
        forged = _forged("V8", (3, "|", (objects, (1,)), None, None, 8, 8, 0))
    else:
        forged = _forged("V8", (3, "|", None, ("a",), {"a": (objects, 0)}, 8, 1, 0))
    data = pickle.dumps({"weights": InBand(n, forged)}, protocol=5)
    assert pickle.loads(data)["weights"].tobytes()[:8] == bytes(8)  # the approved values: None
    _approve(tmp_path, data)
    start = data.index(b"\x96" + n.to_bytes(8, "little")) + 9
    _assert_not_run(run_python(CHILD, args=[str(start), "pickle"]), tmp_path)


@pytest.mark.parametrize("dtype", ["field", "O8"])
def test_f2_f3_joblib_raw_array_bytes_as_object_pointers(run_python, tmp_path, dtype):
    joblib = pytest.importorskip("joblib")
    n = 1 << 22  # 32 MiB of array bytes: a loader file under 32 MiB is held whole
    # joblib writes the numeric array's raw bytes after its wrapper; the dtype is then made to hold
    # objects with its flags left at 0 (same length): F2 a structured field, F3 the code itself
    plain, forged = (b"\x8c\x02i8", b"\x8c\x02O8")
    joblib.dump({"w": numpy.zeros(n, dtype=[("a", "<i8")] if dtype == "field" else "<i8")}, tmp_path / "orig")
    data = (tmp_path / "orig").read_bytes()
    assert data.count(plain) == 1
    data = data.replace(plain, forged)
    assert len(data) >= 32 << 20  # else picklegate holds the loader's file whole
    _approve(tmp_path, data)
    start = data.index(b"\x00" * (8 * n))
    _assert_not_run(run_python(CHILD, args=[str(start), "joblib"]), tmp_path)
