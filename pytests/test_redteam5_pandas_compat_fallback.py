"""Red team 5 E5: ``pandas.read_pickle`` of an approved pickle written by an older pandas.

pandas loads such a pickle with ``pickle.load`` first and, when that raises ImportError /
AttributeError / TypeError (a class that moved), rewinds the handle (``handle.seek(0)``) and loads
it again with its ``pickle_compat.Unpickler`` (its own ``find_class`` and REDUCE). Under picklegate
the handle is a ``_core.HashedFile``: its ``seek`` serves the fallback the bytes that were hashed,
still held, or the file read whole again, which must hash the same. Results equal the unguarded
ones; a file rewritten while the first load fails never runs (canary)."""

import hashlib
import os
import pickle
import sys
import types

import pytest

from conftest import write_manifest

pandas = pytest.importorskip("pandas")
numpy = pytest.importorskip("numpy")
INDEX = repr(pandas.Index)  # <class 'pandas.Index'> on pandas 3, the module path on pandas 2

# pandas < 2's Int64Index, which pickle_compat maps to pandas.Index
OLD = b"\x80\x04\x8c\x1bpandas.core.indexes.numeric\x94\x8c\nInt64Index\x94\x93\x94."
# Written into the file (same inode) while pandas' first load fails: run, it creates the canary.
EVIL = b"cos\nsystem\n(S'touch CANARY'\ntR."
N = 2_000_000  # float64: 16 MB, more than the 8 MiB of consumed pages HashedFile gives back at once

CHILD = """
import os, sys, pandas
if sys.argv[1] == "guarded":
    import picklegate
    picklegate.install(policy="pickles.toml", mode="enforce")

rewritten = []

def attacker(event, args):
    # The first load resolves the global that makes it fail: the file changes now, before the
    # fallback reads it again.
    if event == "pickle.find_class" and args[1] in ("Int64Index", "Index") and os.path.exists("evil.pkl") and not rewritten:
        rewritten.append(1)
        with open("old.pkl", "r+b") as f:
            f.truncate(0)
            f.write(open("evil.pkl", "rb").read())

sys.addaudithook(attacker)
try:
    result = pandas.read_pickle("old.pkl")
    if isinstance(result, list):
        array, cls = result
        print("loaded", type(array).__name__, array.dtype, array.shape, float(array.sum()), cls)
    else:
        print("loaded", result)
except Exception as error:
    print("error", type(error).__name__, error)
print("rewritten", rewritten, "canary", os.path.exists("CANARY"))
"""


def old_class_after_array():
    """``[array, Int64Index]`` as a pandas < 2 pickle spells the class: the first load reads the
    array (16 MB) and then fails on the class."""
    module = types.ModuleType("pandas.core.indexes.numeric")

    class Int64Index:
        pass

    Int64Index.__module__, Int64Index.__qualname__ = module.__name__, "Int64Index"
    module.Int64Index = Int64Index
    sys.modules[module.__name__] = module
    try:
        return pickle.dumps([numpy.arange(N, dtype="f8"), Int64Index], protocol=5)
    finally:
        del sys.modules[module.__name__]


class _EmptyIndex:
    """Pickles as ``pandas.Index()``, which raises TypeError: pandas falls back to pickle_compat."""

    def __reduce__(self):
        return (pandas.Index, ())


def array_then_type_error():
    """``[array, pandas.Index()]``: its globals prove the in-band array is data, so the payload is
    read from the file after the check (``live_bytes``); the load then fails with TypeError."""
    return pickle.dumps([numpy.arange(N, dtype="f8"), _EmptyIndex()], protocol=5)


def load(run_python, tmp_path, data, mode, evil=None):
    (tmp_path / "old.pkl").write_bytes(data)
    if evil is not None:
        (tmp_path / "evil.pkl").write_bytes(evil)
    write_manifest(tmp_path / "pickles.toml", (hashlib.sha256(data).hexdigest(), "__main__:*"))
    proc = run_python(CHILD, args=[mode])
    assert proc.returncode == 0, proc.stderr
    for leftover in ("evil.pkl", "CANARY"):
        if (tmp_path / leftover).exists():
            os.remove(tmp_path / leftover)
    return proc.stdout


def test_read_pickle_falls_back_to_pickle_compat_as_without_picklegate(run_python, tmp_path):
    unguarded = load(run_python, tmp_path, OLD, "unguarded")
    assert f"loaded {INDEX}" in unguarded
    assert load(run_python, tmp_path, OLD, "guarded") == unguarded


def test_a_fallback_after_pages_were_given_back_reads_the_file_again(run_python, tmp_path):
    """The first load consumed more than 8 MiB (given back) before failing: the seek back reads
    the file whole again, with the same sha256, and the fallback loads what the unguarded one does."""
    data = old_class_after_array()
    unguarded = load(run_python, tmp_path, data, "unguarded")
    assert f"loaded ndarray float64 ({N},) {float(N * (N - 1) // 2)} {INDEX}" in unguarded
    assert load(run_python, tmp_path, data, "guarded") == unguarded


def test_a_fallback_after_in_band_payloads_were_read_from_the_file(run_python, tmp_path):
    """The array payload is read from the file after the check (proven for the first, standard
    unpickler only); the fallback (pickle_compat's own find_class and REDUCE) reads every byte
    from private memory: same TypeError as unguarded."""
    from picklegate import _core

    data = array_then_type_error()
    (tmp_path / "probe.pkl").write_bytes(data)
    with open(tmp_path / "probe.pkl", "rb") as f:
        assert _core.HashedFile(f.fileno(), 0).live_bytes == N * 8  # the plan this test is about
    unguarded = load(run_python, tmp_path, data, "unguarded")
    assert "error TypeError Index(...) must be called with a collection of some kind" in unguarded
    assert load(run_python, tmp_path, data, "guarded") == unguarded


@pytest.mark.parametrize("make", [lambda: OLD, old_class_after_array, array_then_type_error],
                         ids=["held", "given-back", "in-band"])
def test_a_file_rewritten_before_the_fallback_never_runs(run_python, tmp_path, make):
    """An attacker rewrites the file (same inode) while pandas' first load fails. Unguarded, the
    fallback runs the new bytes (canary), except for a small file, still in the reader's buffer.
    Guarded, the fallback gets the bytes that were hashed (still held) or, where they must be read
    again, the digest mismatch: never the new bytes."""
    data = make()
    unguarded = load(run_python, tmp_path, data, "unguarded", evil=EVIL)
    guarded = load(run_python, tmp_path, data, "guarded", evil=EVIL)
    assert "rewritten [1] canary False" in guarded
    if data == OLD:
        assert unguarded == guarded == f"loaded {INDEX}\nrewritten [1] canary False\n"
    else:
        assert "rewritten [1] canary True" in unguarded
        assert guarded.startswith("error OSError the file changed after its check\n")



def test_hashed_file_seeks_as_a_file_does(tmp_path):
    """``seek``/``tell``/``read`` give what a file over the same bytes gives, across given-back
    pages (each full read gives them back), past the end and from the end."""
    import io

    from picklegate import _core

    data = os.urandom(20 << 20)
    (tmp_path / "f.bin").write_bytes(data)
    with open(tmp_path / "f.bin", "rb") as f:
        hashed, plain = _core.HashedFile(f.fileno(), 0), io.BytesIO(data)
        for offset, whence in [(0, 0), (5, 1), (-3, 2), (len(data) + 7, 0), (100, 0), (0, 0)]:
            assert hashed.seek(offset, whence) == plain.seek(offset, whence)
            assert hashed.read(1 << 10) == plain.read(1 << 10)
            assert hashed.read() == plain.read()
            assert hashed.tell() == plain.tell()
        with pytest.raises(ValueError, match="negative seek position"):
            hashed.seek(-1, 0)
        hashed.close()
        with pytest.raises(ValueError, match="closed file"):
            hashed.seek(0)
