"""Red-team pass 2, A06 (FAILS on main at the time of writing: the archive's code runs under enforce).

`torch.jit.load(f)` of a stream that cannot seek (a pipe here; an HTTP response or a socket file
alike): `_loaders._guard_file_loader` hands such a stream to torch as it is ("its pickle loads are
judged one by one"), but TorchScript's C++ unpickler never goes through Python's pickle, so the
archive's pickles and its scripted `__setstate__` run with no decision at all. (torch.jit.load only
calls `f.read()`.)
"""

from conftest import write_manifest
from test_torch_jit import MAKE

LOAD = """
import os, sys, threading, torch, picklegate

data = open("model.pt", "rb").read()
read, write = os.pipe()
threading.Thread(target=lambda: (os.write(write, data), os.close(write)), daemon=True).start()

def load_model():
    with os.fdopen(read, "rb") as stream:
        return torch.jit.load(stream)

try:
    print("loaded", load_model()(torch.zeros(2)).tolist())
except picklegate.PickleDeniedError as error:
    print("DENIED", error.callsite, error.sha256)
"""


def test_torch_jit_load_of_a_stream_is_judged(run_python, tmp_path, canary):
    path, _ = canary
    run_python(MAKE, args=[str(tmp_path / "model.pt"), str(path)], check=True)
    if path.exists():
        path.unlink()
    control = run_python(LOAD, check=True)
    assert path.exists(), f"the control did not run the archive's __setstate__: {control.stdout}{control.stderr}"
    path.unlink()
    write_manifest(tmp_path / "empty.toml")
    env = {"PICKLEGATE_POLICY": str(tmp_path / "empty.toml"), "PICKLEGATE_MODE": "enforce"}
    proc = run_python(LOAD, env=env, check=True)
    assert not path.exists(), f"torch.jit.load ran an unlisted archive from a stream under enforce: {proc.stdout}"
    assert proc.stdout.startswith("DENIED"), proc.stdout + proc.stderr
    _, callsite, sha = proc.stdout.split()
    assert callsite == "__main__:load_model"
    # the same archive, listed, loads from the stream as it does without picklegate
    write_manifest(tmp_path / "listed.toml", (sha, callsite))
    env["PICKLEGATE_POLICY"] = str(tmp_path / "listed.toml")
    assert run_python(LOAD, env=env, check=True).stdout == control.stdout
