"""Red team 7 H3: the in-band array plan holds for the standard ``find_class`` only (red team 5 E2),
and picklegate looked ``find_class`` up once, before the load; the C unpickler looks it up again at
every global. An unpickler class that computes its attributes (``__getattribute__``) can answer
the two differently: here the victim's class gives the standard ``find_class`` at its first look
and its own hook (``_frombuffer`` -> run the array's text) after. Unguarded, the first look is the
load's, at ``_frombuffer``: the hook never sees the payload. Guarded, picklegate's check took that
first look, so the load got the hook, fed the payload read from the file after the check: the
attacker's rewrite ran under ``enforce`` (and the load behaved unlike the unguarded one). Now an
unpickler whose class overrides ``__getattribute__`` is not asked, and gets the file whole."""

import hashlib
import pickle
import sys

import pytest

from conftest import write_manifest

numpy = pytest.importorskip("numpy")

N = 2 << 20
EVIL = b"import os; os.system('touch CANARY')\n"

CHILD = """
import os, sys, pickle, numpy
START = int(sys.argv[2])

def rewrite(event=None):
    with open("victim.pkl", "r+b") as f:   # same inode, same length
        f.seek(START)
        f.write(EVIL_BYTES)

if sys.argv[1] == "guarded":
    import picklegate
    from picklegate import _core
    picklegate.install(policy="pickles.toml", mode="enforce")
    _core.set_observer(rewrite)            # right after the decision
else:
    rewrite()

def run_text(buf, *args):                  # the victim's own hook: arrays holding code text
    exec(bytes(buf).rstrip(b"\\0"))
    return numpy.frombuffer(buf, dtype="u1")

class FirstLookStandard(pickle.Unpickler):
    def __getattribute__(self, name):
        if name == "find_class":
            state = object.__getattribute__(self, "__dict__")
            state["looks"] = state.get("looks", 0) + 1
            if state["looks"] > 1:
                return lambda m, n: run_text if n == "_frombuffer" else pickle.Unpickler.find_class(self, m, n)
        return super().__getattribute__(name)

class Meta(type):                          # the class answers for itself: the standard find_class
    def __getattribute__(cls, name):
        return pickle.Unpickler.find_class if name == "find_class" else super().__getattribute__(name)

property_looks = []

def first_look_standard(self):
    property_looks.append(1)
    if len(property_looks) > 1:
        return lambda m, n: run_text if n == "_frombuffer" else pickle.Unpickler.find_class(self, m, n)
    return pickle.Unpickler.find_class.__get__(self)    # the base's method, bound to this unpickler

class PropertyFirstLookStandard(pickle.Unpickler, metaclass=Meta):
    find_class = property(first_look_standard)

with open("victim.pkl", "rb") as f:
    unpickler = CLASS(f)
    unpickler.load()
print("loaded", getattr(unpickler, "looks", None) or len(property_looks))
"""


def victim():
    text = b"x = 1\n"
    array = numpy.frombuffer(text + b"\0" * (N - len(text)), dtype="u1").copy()
    data = pickle.dumps(array, protocol=5)
    return data, data.index(b"\x96" + N.to_bytes(8, "little")) + 9


@pytest.mark.parametrize("cls", ["FirstLookStandard", "PropertyFirstLookStandard"])
def test_an_unpickler_that_computes_find_class_is_not_served_the_live_payload(run_python, tmp_path, cls):
    """Also a property whose class's metaclass names the standard ``find_class`` for the class: only
    ``_pickle.Unpickler`` itself is served the payload from the file."""
    data, start = victim()
    code = CHILD.replace("EVIL_BYTES", repr(EVIL)).replace("CLASS(f)", f"{cls}(f)")
    write_manifest(tmp_path / "pickles.toml", (hashlib.sha256(data).hexdigest(), "__main__:*"))
    results = {}
    for mode in ("unguarded", "guarded"):
        (tmp_path / "victim.pkl").write_bytes(data)
        proc = run_python(code, args=[mode, str(start)])
        if mode == "unguarded" and proc.returncode == -11 and cls == "PropertyFirstLookStandard":
            # CPython 3.13.0 itself crashes on a find_class property of an Unpickler subclass.
            pytest.skip(f"CPython {sys.version.split()[0]} crashes on this class without picklegate")
        assert proc.returncode == 0, proc.stderr
        results[mode] = proc.stdout
        assert not (tmp_path / "CANARY").exists(), f"{mode}: bytes written after the check ran"
    assert results["guarded"] == results["unguarded"] == "loaded 2\n"
