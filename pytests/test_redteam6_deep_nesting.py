"""Red team 6 F9: a plain pickle file of tuples nested 300,000 deep (300 KB) crashed the process
(a stack overflow in the in-band array scan's value tracking) under every mode, `off` included,
where the unguarded load takes milliseconds. Tracked tuples now nest at most 64 deep: past that the
scan stops following values, the file is held whole, and the load runs as it would unguarded."""

import pytest

DEPTH = 300_000

CHILD = """
import pickle, sys
MODE = sys.argv[1]
if MODE != "unguarded":
    import picklegate
    picklegate.install(mode=MODE)
with open("nest.pkl", "rb") as f:
    value = pickle.load(f)
    at = f.tell()
depth = 0
while isinstance(value, tuple):
    value, depth = value[0], depth + 1
print(MODE, depth, value, at)
"""


@pytest.mark.parametrize("mode", ["off", "warn", "record"])
def test_a_deeply_nested_tuple_file_loads_as_unguarded(run_python, tmp_path, mode):
    (tmp_path / "nest.pkl").write_bytes(b"\x80\x05N" + b"\x85" * DEPTH + b".")
    unguarded = run_python(CHILD, args=["unguarded"], timeout=60)
    assert unguarded.stdout == f"unguarded {DEPTH} None {DEPTH + 4}\n", unguarded.stderr
    env = {"PICKLEGATE_RECORD": str(tmp_path / "record.jsonl")} if mode == "record" else None
    guarded = run_python(CHILD, args=[mode], env=env, timeout=60)
    assert guarded.returncode == 0, f"exit {guarded.returncode}: {guarded.stderr[-2000:]}"
    assert guarded.stdout == f"{mode} {DEPTH} None {DEPTH + 4}\n"
