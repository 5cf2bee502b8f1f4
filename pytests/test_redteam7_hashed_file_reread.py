"""Red team 7 H1/H2: ``HashedFile.seek`` (red team 5 E5) against a writer who changes the file and
puts it back around pandas' fallback. The approved pickle is ``[array, pandas.Index()]``: its
16 MB payload is read from the file after the check by the first (standard) load, which then fails
with TypeError; pandas seeks back and loads again with ``pickle_compat.Unpickler``.

H1: the payload is rewritten (opcodes) when the first load resolves ``_frombuffer`` and put back
when it resolves ``Index``, before pandas' seek: the re-read hashes the same, so the fallback runs,
and reads only bytes that were hashed in that same pass. H2: the file is rewritten whole (a
pickle that runs ``os.system``) while the fallback runs, after the re-read. Neither serves
unhashed bytes as opcodes: the outcome is the unguarded load's of the approved file."""

import hashlib
import pickle

import pytest

from conftest import write_manifest

pandas = pytest.importorskip("pandas")
numpy = pytest.importorskip("numpy")
N = 2_000_000
EVIL = b"cos\nsystem\n(S'touch CANARY'\ntR."

CHILD = """
import os, sys, pandas
if sys.argv[1] == "guarded":
    import picklegate
    picklegate.install(policy="pickles.toml", mode="enforce")
how, offset, size = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
original = open("old.pkl", "rb").read()
evil = open("evil.pkl", "rb").read()
events = []
writes = []

def write(data, at=0):
    writes.append(at)
    with open("old.pkl", "r+b") as f:
        f.seek(at)
        f.write(data)

def attacker(event, args):
    if event != "pickle.find_class":
        return
    events.append(args[1])
    if how == "restore" and args[1] == "_frombuffer" and events.count("_frombuffer") == 1:
        write((evil * (size // len(evil) + 1))[:size], offset)   # the payload, after the check
    elif how == "restore" and args[1] == "Index" and events.count("Index") == 1:
        write(original)                                         # put back before the seek
    elif how == "after-reread" and args[1] == "Index" and events.count("Index") == 2:
        write(evil.ljust(len(original), b"."))                  # during the fallback

sys.addaudithook(attacker)
try:
    pandas.read_pickle("old.pkl")
    print("loaded")
except Exception as error:
    print("error", type(error).__name__, error)
print("writes", len(writes), "canary", os.path.exists("CANARY"))
"""


class _EmptyIndex:
    def __reduce__(self):
        return (pandas.Index, ())


@pytest.mark.parametrize("how", ["restore", "after-reread"])
def test_a_file_changed_and_put_back_around_the_fallback_serves_only_hashed_bytes(run_python, tmp_path, how):
    array = numpy.arange(N, dtype="f8")
    data = pickle.dumps([array, _EmptyIndex()], protocol=5)
    offset = data.find(array.tobytes()[:4096])
    assert offset > 0
    from picklegate import _core

    (tmp_path / "old.pkl").write_bytes(data)
    with open(tmp_path / "old.pkl", "rb") as f:
        assert _core.HashedFile(f.fileno(), 0).live_bytes == N * 8  # the payload is read after the check
    (tmp_path / "evil.pkl").write_bytes(EVIL)
    write_manifest(tmp_path / "pickles.toml", (hashlib.sha256(data).hexdigest(), "__main__:*"))
    args = [how, str(offset), str(N * 8)]
    proc = run_python(CHILD, args=["guarded", *args])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ("error TypeError Index(...) must be called with a collection of some kind, "
                           "None was passed\n"
                           f"writes {2 if how == 'restore' else 1} canary False\n"), proc.stdout + proc.stderr
