"""A file rewritten after its check never runs its new pickle (issue 11 findings 3 and 4, issue 12).

Each child loads an allowed file under `enforce`, and the file is rewritten in place (same inode, same
length: a payload padded after its STOP) at a deterministic moment: when picklegate decides (the
decision observer), and whenever the process opens the file a second time or through
`/proc/self/fd/N` (an audit hook). The canary file exists only if the new pickle ran."""

import pickle
import zlib
import zipfile

import pytest

from conftest import Canary, write_manifest

HARNESS = """
import os, sys, picklegate
from picklegate import _core
PATH, EVIL = sys.argv[1], open(sys.argv[2], "rb").read()
done = []

def rewrite(reason):
    if not done:
        done.append(reason)
        if os.path.exists(sys.argv[3]):          # a rename swap instead of an in-place write
            os.replace(sys.argv[3], PATH)
        else:
            with open(PATH, "r+b") as f:         # same inode, same length
                f.write(EVIL)

def watch(event):
    rewrite("decision")

def audit(name, args):
    if name == "open" and args and isinstance(args[0], str) and (
            args[0].startswith("/proc/self/fd/") or (os.path.abspath(args[0]) == os.path.abspath(PATH) and opened)):
        rewrite("reopen")
    elif name == "open" and args and isinstance(args[0], str) and os.path.abspath(args[0]) == os.path.abspath(PATH):
        opened.append(1)

opened = []
picklegate.install(policy="pickles.toml")
_core.set_observer(watch)
sys.addaudithook(audit)

def load_model(path):
    return LOAD

try:
    result = load_model(PATH)
    print("loaded", type(result).__name__)
except picklegate.PickleDeniedError:
    print("denied")
print("rewritten:", done)
"""


def padded(payload, size):
    assert len(payload) < size
    return payload + b"\0" * (size - len(payload))


def run_case(run_python, tmp_path, load, good_bytes, evil_bytes, imports="", swap=False):
    """Writes the allowed file, runs the harness with ``load`` as the library call; returns stdout."""
    target = tmp_path / "target.bin"
    target.write_bytes(good_bytes)
    (tmp_path / "evil.bin").write_bytes(evil_bytes)
    write_manifest(tmp_path / "pickles.toml", (__import__("hashlib").sha256(good_bytes).hexdigest(), "__main__:*"))
    swap_path = tmp_path / "swap.bin"
    if swap:
        # The path starts out naming the payload; the allowed file is renamed over it later.
        swap_path.write_bytes(good_bytes)
        target.write_bytes(evil_bytes)
    code = imports + "\n" + HARNESS.replace("LOAD", load)
    proc = run_python(code, args=[str(target), str(tmp_path / "evil.bin"), str(swap_path)])
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def canary_pickle(tmp_path):
    return pickle.dumps(Canary(tmp_path / "CANARY"), protocol=2)


# A file this large has its tensor/array bytes read from the file after the check (the plan under
# test); a smaller one is kept whole in private memory.
LARGE = 40 << 20


def live_bytes(good, layout, tmp_path):
    """How many bytes of ``good`` a loader's checked file reads from the file after the check."""
    from picklegate import _core

    probe = tmp_path / "probe.bin"
    probe.write_bytes(good)
    with open(probe, "rb") as f:
        return _core.PinnedFile(f.fileno(), layout).live_bytes


def torch_files(tmp_path, large=False):
    """A torch checkpoint, and the same checkpoint with its data.pkl replaced in place (CRCs fixed)."""
    import io
    import torch

    buffer = io.BytesIO()
    big = {"big": torch.zeros(LARGE // 4)} if large else {}
    torch.save({"w": torch.arange(4096.0), "note": "x" * 400, **big}, buffer)
    good = buffer.getvalue()
    with zipfile.ZipFile(io.BytesIO(good)) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data.pkl"))
    name_len, extra_len = int.from_bytes(good[info.header_offset + 26:info.header_offset + 28], "little"), int.from_bytes(good[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    record = padded(canary_pickle(tmp_path), info.compress_size)
    evil = bytearray(good)
    evil[start:start + len(record)] = record
    crc = zlib.crc32(record).to_bytes(4, "little")
    evil[info.header_offset + 14:info.header_offset + 18] = crc
    central = good.index(b"PK\x01\x02")
    while True:
        central = good.index(b"PK\x01\x02", central)
        n = int.from_bytes(good[central + 28:central + 30], "little")
        if good[central + 46:central + 46 + n] == info.filename.encode():
            break
        central += 4
    evil[central + 16:central + 20] = crc
    return good, bytes(evil)


@pytest.mark.parametrize("large", [False, True], ids=["small", "large"])
@pytest.mark.parametrize("mmap", [True, False])
def test_torch_checkpoint_rewritten_after_the_check_does_not_run(run_python, tmp_path, mmap, large):
    pytest.importorskip("torch")
    good, evil = torch_files(tmp_path, large)
    assert (live_bytes(good, "torch-zip", tmp_path) >= LARGE) == large
    out = run_case(run_python, tmp_path, f"torch.load(path, weights_only=False, mmap={mmap})", good, evil, "import torch")
    assert "loaded dict" in out, out
    assert "rewritten: ['" in out, out
    assert not (tmp_path / "CANARY").exists()


def joblib_files(tmp_path, large=False):
    import io
    import joblib
    import numpy

    buffer = io.BytesIO()
    big = {"big": numpy.zeros(LARGE // 8)} if large else {}
    joblib.dump({"a": numpy.arange(2000.0), **big}, buffer)
    good = buffer.getvalue()
    return good, padded(canary_pickle(tmp_path), len(good))


@pytest.mark.parametrize("mmap_mode", ["r", None])
@pytest.mark.parametrize("large", [False, True], ids=["small", "large"])
def test_joblib_file_rewritten_after_the_check_does_not_run(run_python, tmp_path, mmap_mode, large):
    pytest.importorskip("joblib")
    good, evil = joblib_files(tmp_path, large)
    assert (live_bytes(good, "joblib", tmp_path) >= LARGE) == large
    out = run_case(run_python, tmp_path, f"joblib.load(path, mmap_mode={mmap_mode!r})", good, evil, "import joblib")
    assert "loaded dict" in out, out
    assert "rewritten: ['" in out, out
    assert not (tmp_path / "CANARY").exists()


def plain_files(tmp_path):
    good = pickle.dumps({"pad": "x" * 2000})
    return good, padded(canary_pickle(tmp_path), len(good))


@pytest.mark.parametrize("load", [
    "numpy.load(path, mmap_mode='r', allow_pickle=True)",
    "numpy.load(path, allow_pickle=True)",
    "pickle.load(open(path, 'rb'))",
    "pandas.read_pickle(path)",
])
def test_plain_pickle_file_rewritten_after_the_check_does_not_run(run_python, tmp_path, load):
    pytest.importorskip("numpy")
    good, evil = plain_files(tmp_path)
    out = run_case(run_python, tmp_path, load, good, evil, "import pickle, numpy, pandas")
    assert "loaded dict" in out, out
    assert "rewritten: ['" in out, out
    assert not (tmp_path / "CANARY").exists()


def test_npz_with_mmap_mode_is_judged_on_the_file_numpy_opened_not_by_path(run_python, tmp_path):
    """The path names the payload when numpy opens it; the allowed file is renamed over the path
    before the member is judged. The member numpy reads is the one that must be judged."""
    numpy = pytest.importorskip("numpy")
    import io

    def npz(obj):
        buffer = io.BytesIO()
        numpy.savez(buffer, objects=numpy.array([obj], dtype=object))
        return buffer.getvalue()

    good = npz({"x": 1})
    evil = npz(Canary(tmp_path / "CANARY"))
    out = run_case(run_python, tmp_path, "numpy.load(path, mmap_mode='r', allow_pickle=True)['objects']", good, evil,
                   "import numpy", swap=True)
    assert "denied" in out, out
    assert not (tmp_path / "CANARY").exists()


@pytest.mark.parametrize("kind", ["bytearray", "mmap"])
def test_a_mutable_buffer_rewritten_after_the_check_does_not_run(run_python, tmp_path, kind):
    """pickle.loads of memory someone else can write: the bytes unpickled are the bytes hashed."""
    good = pickle.dumps({"pad": "x" * 200})
    evil = padded(canary_pickle(tmp_path), len(good))
    write_manifest(tmp_path / "pickles.toml", (__import__("hashlib").sha256(good).hexdigest(), "__main__:*"))
    proc = run_python(f"""
        import mmap, pickle, picklegate
        from picklegate import _core
        GOOD, EVIL = {good!r}, {evil!r}
        if {kind!r} == "mmap":
            buffer = mmap.mmap(-1, len(GOOD))
            buffer.write(GOOD)
        else:
            buffer = bytearray(GOOD)
        def watch(event):
            buffer[:] = EVIL                      # another writer, between the check and the load
        picklegate.install(policy="pickles.toml")
        _core.set_observer(watch)
        print(pickle.loads(buffer))
        print(bytes(buffer) == EVIL)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str({"pad": "x" * 200}), "True"]
    assert not (tmp_path / "CANARY").exists()


def test_torch_checkpoint_of_many_small_tensors_loads_the_same_values_guarded(run_python, tmp_path):
    """Small storages are read from the file after the check through a read-ahead window: every
    tensor (tiny, window-sized, larger than a window read, crossing window edges) must come back
    exactly as the unguarded load gives it."""
    pytest.importorskip("torch")
    import hashlib

    import torch

    sizes = [1, 3, 250, 4095, 4097, 40_000, 7, 33_000, 1, 16_383, 16_385, 200_000] * 40
    torch.save({f"t{i}": torch.arange(float(n)) * (i + 1) for i, n in enumerate(sizes)}, tmp_path / "many.pt")
    assert live_bytes((tmp_path / "many.pt").read_bytes(), "torch-zip", tmp_path) > LARGE
    write_manifest(tmp_path / "pickles.toml", (hashlib.sha256((tmp_path / "many.pt").read_bytes()).hexdigest(), "__main__:*"))
    proc = run_python("""
        import hashlib, sys, torch, picklegate
        plain = torch.load("many.pt", weights_only=False)
        picklegate.install(policy="pickles.toml")
        guarded = torch.load("many.pt", weights_only=False)
        assert list(guarded) == list(plain)
        for name, tensor in plain.items():
            assert torch.equal(guarded[name], tensor), name
        print("same", len(guarded))
    """)
    assert proc.returncode == 0, proc.stderr
    assert "same 480" in proc.stdout
