"""Red team 5 E5: ``pandas.read_pickle`` of an approved pickle written by an older pandas.

pandas loads such a pickle with ``pickle.load`` first and, when that raises ImportError /
AttributeError / TypeError (a class that moved), rewinds the handle (``handle.seek(0)``) and loads
it again with its ``pickle_compat.Unpickler``. Under picklegate the handle is a
``_core.HashedFile``, which has no ``seek``: the approved load fails where the unguarded one
succeeds (promise 2, approved loads are untouched)."""

import hashlib

import pytest

from conftest import write_manifest

pytest.importorskip("pandas")

# pandas < 2's Int64Index, which pickle_compat maps to pandas.Index
OLD = b"\x80\x04\x8c\x1bpandas.core.indexes.numeric\x94\x8c\nInt64Index\x94\x93\x94."

CHILD = """
import sys, pandas
if sys.argv[1] == "guarded":
    import picklegate
    picklegate.install(policy="pickles.toml", mode="enforce")
print(pandas.read_pickle("old.pkl"))
"""


@pytest.mark.xfail(strict=True, reason="red team 5 E5: HashedFile has no seek; pandas' pickle_compat fallback fails")
def test_read_pickle_falls_back_to_pickle_compat_as_without_picklegate(run_python, tmp_path):
    (tmp_path / "old.pkl").write_bytes(OLD)
    write_manifest(tmp_path / "pickles.toml", (hashlib.sha256(OLD).hexdigest(), "__main__:*"))
    unguarded = run_python(CHILD, args=["unguarded"])
    assert unguarded.returncode == 0, unguarded.stderr
    assert "pandas.Index" in unguarded.stdout
    guarded = run_python(CHILD, args=["guarded"])
    assert (guarded.returncode, guarded.stdout) == (0, unguarded.stdout), guarded.stderr
