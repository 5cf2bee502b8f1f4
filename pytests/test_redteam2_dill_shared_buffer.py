"""Red-team pass 2, A05 (FAILS on main at the time of writing: the payload runs under enforce).

`pickle.loads` copies a buffer that is not `bytes` before hashing it (issue 11, finding 4), but
`dill.loads` goes through `_loaders._guard_bytes_loader` -> `_core.guarded_container`, which hashes
the caller's buffer where it lies (`Content::Buffer`) and lets dill copy it into a BytesIO later.
Another process that writes the shared memory (here: flips one byte, `BINGET 1` -> `BINGET 2`, i.e.
`builtins.len` -> `builtins.eval`) between the hash and dill's copy runs bytes the manifest does not
list, under the listed bytes' verdict.
"""

SCRIPT = r'''
import hashlib, mmap, os, signal, sys, time
canary = sys.argv[2]
code = f"__import__('os').system('touch {canary}')".encode()

def payload(which):
    return (b"\x80\x04" + b"\x8c\x08builtins\x94" + b"\x8c\x03len\x94" + b"\x8c\x04eval\x94" + b"000"
            + b"h\x00" + b"h" + bytes([which]) + b"\x93" + b"\x8c" + bytes([len(code)]) + code + b"\x85R.")

listed, evil = payload(1), payload(2)
pos = next(i for i in range(len(listed)) if listed[i] != evil[i])
with open("policy.toml", "w") as f:
    f.write(f'version = 1\n[[allow]]\nsha256 = "{hashlib.sha256(listed).hexdigest()}"\ncallsite = "__main__:reader"\n')
import dill
if sys.argv[1] == "guarded":
    import picklegate
    picklegate.install(mode="enforce", policy="policy.toml")
shared = mmap.mmap(-1, len(listed))   # MAP_SHARED: what another process writes, this one reads
shared[:] = listed
if sys.argv[1] == "control":
    shared[pos] = 2
    dill.loads(shared)
    sys.exit()
writer = os.fork()
if writer == 0:
    while True:
        shared[pos] = 1
        shared[pos] = 2

def reader():
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not os.path.exists(canary):
        try:
            dill.loads(shared)
        except Exception:
            pass

try:
    reader()
finally:
    os.kill(writer, signal.SIGKILL)
    os.waitpid(writer, 0)
'''


def test_dill_loads_of_a_shared_buffer_runs_the_bytes_that_were_hashed(run_python, canary):
    path, _ = canary
    run_python(SCRIPT, args=["control", str(path)], check=True)
    assert path.exists(), "the control did not run the payload"
    path.unlink()
    proc = run_python(SCRIPT, args=["guarded", str(path)], check=True)
    assert not path.exists(), f"unlisted bytes ran under enforce through dill.loads: {proc.stderr[-500:]}"
