"""Red team 5 E2: an unpickler subclass whose ``find_class`` is an instance attribute.

The in-band array plan (payloads read from the file after the check) holds only for the standard
``find_class``: the proof takes the name ``numpy._core.numeric._frombuffer`` for numpy's. The C
unpickler calls ``self.find_class``, where an instance attribute of a subclass wins over the
class's; picklegate looked at the class's only, so such an unpickler was served the payload from
the file after the check. Here the victim's own hook maps ``_frombuffer`` to a function that runs
the array's text (the same hook as a class method is the control): the attacker rewrites the
payload after the check, and under ``enforce`` the canary must not appear."""

import hashlib
import pickle

import pytest

from conftest import write_manifest

numpy = pytest.importorskip("numpy")

N = 2 << 20
EVIL = b"import os; os.system('touch CANARY')\n"

CHILD = """
import os, sys, pickle, numpy
GUARDED, LEVEL, START = sys.argv[1] == "guarded", sys.argv[2], int(sys.argv[3])
EVIL = EVIL_BYTES

def rewrite(event=None):
    with open("victim.pkl", "r+b") as f:   # same inode, same length
        f.seek(START)
        f.write(EVIL)

if GUARDED:
    import picklegate
    from picklegate import _core
    picklegate.install(policy="pickles.toml", mode="enforce")
    _core.set_observer(rewrite)            # right after the decision
else:
    rewrite()

def run_text(buf, *args):                  # the victim's own hook: arrays holding code text
    exec(bytes(buf).rstrip(b"\\0"))
    return numpy.frombuffer(buf, dtype="u1")

class ClassLevel(pickle.Unpickler):
    def find_class(self, module, name):
        return run_text if name == "_frombuffer" else super().find_class(module, name)

class InstanceLevel(pickle.Unpickler):
    def __init__(self, f):
        super().__init__(f)
        self.find_class = lambda m, n: run_text if n == "_frombuffer" else pickle.Unpickler.find_class(self, m, n)

with open("victim.pkl", "rb") as f:
    (InstanceLevel if LEVEL == "instance" else ClassLevel)(f).load()
print("loaded")
"""


def victim():
    text = b"x = 1\n"
    array = numpy.frombuffer(text + b"\0" * (N - len(text)), dtype="u1").copy()
    data = pickle.dumps(array, protocol=5)
    return data, data.index(b"\x96" + N.to_bytes(8, "little")) + 9


@pytest.mark.parametrize("level", ["class", "instance"])
def test_a_find_class_set_on_the_instance_keeps_the_file_whole(run_python, tmp_path, level):
    data, start = victim()
    (tmp_path / "victim.pkl").write_bytes(data)
    write_manifest(tmp_path / "pickles.toml", (hashlib.sha256(data).hexdigest(), "__main__:*"))
    code = CHILD.replace("EVIL_BYTES", repr(EVIL))

    control = run_python(code, args=["unguarded", level, str(start)])
    assert control.returncode == 0, control.stderr
    assert (tmp_path / "CANARY").exists(), "the control must run the rewritten payload"
    (tmp_path / "CANARY").unlink()
    (tmp_path / "victim.pkl").write_bytes(data)

    proc = run_python(code, args=["guarded", level, str(start)])
    assert proc.returncode == 0, proc.stderr
    assert "loaded" in proc.stdout
    assert not (tmp_path / "CANARY").exists(), "bytes written after the check ran"
