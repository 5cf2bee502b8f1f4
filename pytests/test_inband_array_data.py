"""In-band numpy array payloads of a plain pickle file are data read after the check (issue 12).

A protocol-5 pickle carries each numpy array in-band as ``_frombuffer(BYTEARRAY8, dtype, shape,
order)``. picklegate hashes such a payload without keeping it and the unpickler reads it from the
file after the check, but only when the scan proves it reaches nothing but ``_frombuffer``. Each
child loads an allowed file under ``enforce`` and the file changes at a deterministic moment (the
decision observer): opcodes rewritten never run, array bytes rewritten are what loads (SECURITY.md:
data after the check), a payload that could reach code stays private, a file cut short fails as the
unguarded load does."""

import hashlib
import pickle

import pytest

from conftest import write_manifest

numpy = pytest.importorskip("numpy")

N = 300_000  # float64: 2.4 MB, above the 1 MiB threshold

HARNESS = """
import os, sys, picklegate, pickle, numpy, pandas
from picklegate import _core
PATH, EVIL = sys.argv[1], open(sys.argv[2], "rb").read()
done, decisions = [], []
AT = int(os.environ.get("REWRITE_AT", "1"))   # the decision after which the file changes

def watch(event):
    decisions.append(1)
    if len(decisions) == AT and not done:
        done.append(1)
        if EVIL == b"truncate":
            os.truncate(PATH, os.path.getsize(PATH) // 2)
        else:
            with open(PATH, "r+b") as f:         # same inode, same length
                f.write(EVIL)

if GUARDED:
    picklegate.install(policy="pickles.toml")
    _core.set_observer(watch)
else:
    watch(None)

def load_model(path):
    return LOAD

try:
    result = load_model(PATH)
    print("loaded", SUMMARY)
except picklegate.PickleDeniedError:
    print("denied")
except Exception as e:
    print("error", type(e).__name__)
print("rewritten:", done)
"""


def run(run_python, tmp_path, good, evil, load="pickle.load(open(path, 'rb'))", summary="type(result).__name__",
        guarded=True, allowed=(), rewrite_at=1):
    target = tmp_path / "target.pkl"
    target.write_bytes(good)
    (tmp_path / "evil.bin").write_bytes(evil)
    shas = [hashlib.sha256(good).hexdigest(), *(hashlib.sha256(a).hexdigest() for a in allowed)]
    write_manifest(tmp_path / "pickles.toml", *((sha, "__main__:*") for sha in shas))
    code = HARNESS.replace("LOAD", load).replace("SUMMARY", summary).replace("GUARDED", str(guarded))
    proc = run_python(code, args=[str(target), str(tmp_path / "evil.bin")], env={"REWRITE_AT": str(rewrite_at)})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def array_file():
    return pickle.dumps({"a": numpy.arange(N, dtype="f8")}, protocol=5)


def payload_span(data, length):
    """Where the BYTEARRAY8 payload of ``length`` bytes lies in ``data``."""
    header = b"\x96" + length.to_bytes(8, "little")
    start = data.index(header) + len(header)
    return start, start + length


def test_hashed_file_serves_the_array_payload_from_the_file(tmp_path):
    from picklegate import _core

    good = array_file()
    path = tmp_path / "a.pkl"
    path.write_bytes(good)
    start, end = payload_span(good, N * 8)
    with open(path, "rb") as f:
        hashed = _core.HashedFile(f.fileno(), 0)
        assert hashed.sha256 == hashlib.sha256(good).hexdigest()
        assert hashed.live_bytes == N * 8
        # read, readinto and readline across the payload give the file's bytes, position kept
        assert hashed.read(start - 5) == good[:start - 5]
        buffer = bytearray(100)
        assert hashed.readinto(buffer) == 100 and bytes(buffer) == good[start - 5:start + 95]
        assert hashed.readline() == good[start + 95:good.index(b"\n", start + 95) + 1]
        rest = hashed.read()
        assert hashed.tell() == len(good) and good.endswith(rest)
        assert hashed.read() == b""


def test_opcodes_rewritten_after_the_check_do_not_run(run_python, tmp_path):
    from conftest import Canary

    good = array_file()
    canary = pickle.dumps(Canary(tmp_path / "CANARY"), protocol=2)
    evil = canary + b"\0" * (len(good) - len(canary))
    for load in ("pickle.load(open(path, 'rb'))", "pandas.read_pickle(path)"):
        out = run(run_python, tmp_path, good, evil, load)
        assert "loaded dict" in out, out
        assert "rewritten: [1]" in out, out
        assert not (tmp_path / "CANARY").exists()


@pytest.mark.parametrize("load", ["pickle.load(open(path, 'rb'))", "pickle.Unpickler(open(path, 'rb')).load()",
                                  "pandas.read_pickle(path)"])
def test_array_bytes_rewritten_after_the_check_are_the_values_loaded(run_python, tmp_path, load):
    good = array_file()
    start, end = payload_span(good, N * 8)
    evil = bytearray(good)
    evil[start:end] = numpy.full(N, 7.0).tobytes()
    out = run(run_python, tmp_path, good, bytes(evil), load, "float(result['a'].sum())")
    # data after the check: the new numbers load (SECURITY.md), and nothing else changed
    assert f"loaded {7.0 * N}" in out, out


def test_a_reused_unpickler_keeps_the_array_private(run_python, tmp_path):
    good = array_file()
    start, end = payload_span(good, N * 8)
    evil = bytearray(good + good)
    evil[len(good) + start:len(good) + end] = numpy.full(N, 7.0).tobytes()
    # the second load of one unpickler: its memo holds the first load's objects
    load = "(lambda u: (u.load(), u.load()))(pickle.Unpickler(open(path, 'rb')))"
    out = run(run_python, tmp_path, good + good, bytes(evil), load, "float(result[1]['a'].sum())", allowed=[good],
              rewrite_at=2)
    assert f"loaded {float(numpy.arange(N).sum())}" in out, out  # the hashed numbers
    assert "rewritten: [1]" in out, out


def exec_of_payload_pickle(source):
    """``[_frombuffer(P, uint8, (n,), 'C'), exec(bytes(P))]``: the payload is also fetched from the
    memo and run as code, so it must stay private."""
    n = 1 << 20
    payload = source.ljust(n, b" ")
    text = lambda s: b"\x8c" + bytes([len(s)]) + s.encode()  # noqa: E731
    glob = lambda m, n_: text(m) + text(n_) + b"\x93"  # noqa: E731
    dtype = glob("numpy", "dtype") + text("u1") + b"\x89\x88\x87R(K\x03" + text("|") + \
        b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    return (b"\x80\x05](" + glob("numpy._core.numeric", "_frombuffer") + b"(\x96" + n.to_bytes(8, "little")
            + payload + b"\x94" + dtype + b"J" + n.to_bytes(4, "little") + b"\x85" + text("C") + b"tR"
            + glob("builtins", "exec") + glob("builtins", "bytes") + b"h\x00\x85R\x85Re.")


def test_a_payload_that_also_reaches_code_stays_private(run_python, tmp_path):
    good = exec_of_payload_pickle(b"x = 1\n")
    assert pickle.loads(good)[1] is None
    evil = exec_of_payload_pickle(f"open({str(tmp_path / 'CANARY')!r}, 'w').close()\n".encode())
    assert len(evil) == len(good)
    out = run(run_python, tmp_path, good, evil, summary="bytes(result[0][:6])")
    assert "loaded b'x = 1\\n'" in out, out  # the hashed bytes, not the rewritten ones
    assert "rewritten: [1]" in out, out
    assert not (tmp_path / "CANARY").exists()


@pytest.mark.parametrize("load", ["pickle.load(open(path, 'rb'))", "pandas.read_pickle(path)"])
def test_a_file_cut_short_after_the_check_fails_as_unguarded(run_python, tmp_path, load):
    good = array_file()
    unguarded = run(run_python, tmp_path, good, b"truncate", load, guarded=False)
    guarded = run(run_python, tmp_path, good, b"truncate", load)
    assert unguarded.startswith("error "), unguarded
    assert guarded.splitlines()[0] == unguarded.splitlines()[0], (guarded, unguarded)


def test_pandas_frame_round_trips(run_python, tmp_path):
    pandas = pytest.importorskip("pandas")
    frame = pandas.DataFrame({"x": numpy.arange(N, dtype="f8"), "y": numpy.arange(N), "s": ["a"] * N})
    frame.to_pickle(tmp_path / "frame.pkl", protocol=5)
    good = (tmp_path / "frame.pkl").read_bytes()
    summary = "(result.shape, float(result['x'].sum()), int(result['y'].sum()), result['s'].iloc[-1])"
    out = run(run_python, tmp_path, good, good, "pandas.read_pickle(path)", summary)
    assert f"loaded (({N}, 3), {float(numpy.arange(N).sum())}, {int(numpy.arange(N).sum())}, 'a')" in out, out
