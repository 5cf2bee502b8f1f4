"""A reused unpickler keeps its memo across loads; a `[[trust]]`-judged load on it must not reach
an earlier (listed) load's memo entries (red-team S2: MEMOIZE numbers after the memo's length, so
nine MEMOIZEs and a BINGET 8 fetched the header's `builtins.getattr` without naming a global)."""

import pytest

SCRIPT = """
import datetime, hashlib, io, os, pickle, sys, zoneinfo

def task(x):
    return x

def sh(text):
    data = text.encode()
    return b"\\x8c" + bytes([len(data)]) + data

def call(function, *args):
    return function + b"(" + b"".join(args) + b"tR"

# the stream's header: a reviewed pickle, listed by sha256; its memo holds builtins.getattr
header = pickle.dumps({"when": datetime.datetime(2026, 11, 24, tzinfo=zoneinfo.ZoneInfo("UTC"))}, protocol=4)
probe = pickle._Unpickler(io.BytesIO(header))
probe.load()
key = next(k for k, v in probe.memo.items() if v is getattr)

def message(canary):
    pad = b"".join(sh("pad") + b"\\x94" + b"0" for _ in range(key + 1))   # MEMOIZE, POP
    g = b"h" + bytes([key])                                               # BINGET key
    function = sh("__main__") + sh("task") + b"\\x93"                     # the one global named
    globals_ = call(g, function, sh("__globals__"))
    builtins = call(call(g, globals_, sh("get")), sh("__builtins__"))
    return b"\\x80\\x04" + pad + call(call(g, builtins, sh("eval")), sh(f"__import__('os').system('touch {canary}')")) + b"."

def serve(stream):
    unpickler = (pickle._Unpickler if sys.argv[2] == "python" else pickle.Unpickler)(stream)
    header = unpickler.load()
    plain = unpickler.load()            # a trusted message naming only __main__.task: still loads
    try:
        unpickler.load()
        print("RAN")
    except Exception as error:
        print(type(error).__name__, error)
    return header, plain

with open("policy.toml", "w") as f:
    f.write(f'''version = 1
[[allow]]
sha256 = "{hashlib.sha256(header).hexdigest()}"
callsite = "__main__:serve"

[[trust]]
callsite = "__main__:serve"
globals = ["__main__.task"]
''')
if sys.argv[1] == "guarded":
    import picklegate
    picklegate.install(mode="enforce", policy="policy.toml")
read, write = os.pipe()                 # a stream: each load reads one pickle
os.write(write, header + pickle.dumps(task, protocol=4) + message(sys.argv[3]))
os.close(write)
with os.fdopen(read, "rb") as stream:
    header_obj, plain = serve(stream)
print(header_obj["when"].tzinfo.key, plain is task)
"""


@pytest.mark.parametrize("unpickler", ["c", "python"])
def test_a_trusted_load_cannot_reach_an_earlier_load_s_memo(unpickler, run_python, canary):
    path, _ = canary
    control = run_python(SCRIPT, args=["control", unpickler, str(path)], check=True)
    assert path.exists(), f"the control did not run the payload: {control.stdout}"
    path.unlink()
    proc = run_python(SCRIPT, args=["guarded", unpickler, str(path)], check=True)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("PickleDeniedError") and "was never stored" in lines[0], proc.stdout + proc.stderr
    assert lines[-1] == "UTC True", proc.stdout  # the listed header and the plain message still load
    assert not path.exists(), "an earlier load's memo entry reached a trusted load"
