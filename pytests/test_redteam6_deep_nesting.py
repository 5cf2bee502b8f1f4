"""Red team 6 F9: a plain pickle file of tuples nested 300,000 deep (300 KB) crashed the process
(a stack overflow in the in-band array scan's value tracking) under every mode, `off` included,
where the unguarded load takes milliseconds. Tracked tuples now nest at most 64 deep: past that the
scan stops following values, the file is held whole, and the load runs as it would unguarded.

The same family, found after the pass: tuples shared through the memo made the scan's walks
exponential (251 bytes: 12 levels of 8 references to the level below, never finished) or quadratic
(a 50,000-item tuple fetched and popped 50,000 times: 20 s). Tuples are now shared, not copied, on
GET, and a scan's walks visit at most 4M values."""

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


def shared_levels():
    data = b"\x80\x05(" + b"N" * 8 + b"t\x94"
    for level in range(12):
        data += b"(" + (b"h" + bytes([level])) * 8 + b"t\x94"
    return data + (b"h\x0c0") * 3 + b"h\x0c."


def wide_popped():
    return b"\x80\x05(" + b"N" * 50_000 + b"t\x94" + b"h\x000" * 50_000 + b"h\x00."


@pytest.mark.parametrize("mode", ["off", "warn", "record"])
def test_a_deeply_nested_tuple_file_loads_as_unguarded(run_python, tmp_path, mode):
    (tmp_path / "nest.pkl").write_bytes(b"\x80\x05N" + b"\x85" * DEPTH + b".")
    unguarded = run_python(CHILD, args=["unguarded"], timeout=60)
    assert unguarded.stdout == f"unguarded {DEPTH} None {DEPTH + 4}\n", unguarded.stderr
    env = {"PICKLEGATE_RECORD": str(tmp_path / "record.jsonl")} if mode == "record" else None
    guarded = run_python(CHILD, args=[mode], env=env, timeout=60)
    assert guarded.returncode == 0, f"exit {guarded.returncode}: {guarded.stderr[-2000:]}"
    assert guarded.stdout == f"{mode} {DEPTH} None {DEPTH + 4}\n"


@pytest.mark.parametrize("make", [shared_levels, wide_popped], ids=["shared-levels", "wide-popped"])
def test_tuples_shared_through_the_memo_load_as_unguarded(run_python, tmp_path, make):
    data = make()
    (tmp_path / "nest.pkl").write_bytes(data)
    unguarded = run_python(CHILD, args=["unguarded"], timeout=60)
    assert unguarded.returncode == 0, unguarded.stderr
    guarded = run_python(CHILD, args=["warn"], timeout=60)  # unbounded, this ran for hours
    assert guarded.returncode == 0, guarded.stderr[-2000:]
    assert guarded.stdout.replace("warn", "unguarded", 1) == unguarded.stdout
