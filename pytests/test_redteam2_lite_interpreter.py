"""Red-team pass 2, A07 (FAILS on main at the time of writing: the archive's code runs under enforce).

`torch.jit.mobile._load_for_lite_interpreter(path)` (a `.ptl` archive saved by
`_save_for_lite_interpreter`) is read by torch's C++ lite interpreter: its pickles and its scripted
`__setstate__` run without Python's pickle, and picklegate patches only `torch.load`, `torch.jit.load`
and `torch.package`, so the file is never judged, whatever the mode.
"""

from conftest import write_manifest

MAKE = """
import sys, torch
from typing import Tuple

class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.path = ""
        self.buf = torch.zeros(16, dtype=torch.uint8)

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool]:
        return (self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]) -> None:
        self.path = state[0]
        self.training = state[1]
        self.buf = torch.from_file(self.path, True, 16, dtype=torch.uint8)   # shared=True creates the file

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1

model = Model()
model.path = sys.argv[2]
torch.jit.script(model)._save_for_lite_interpreter(sys.argv[1])
"""

LOAD = """
import torch, picklegate
from torch.jit.mobile import _load_for_lite_interpreter

def load_model():
    return _load_for_lite_interpreter("model.ptl")

import pickle
try:
    pickle.loads(pickle.dumps(1))
    print("picklegate is not enforcing")
except picklegate.PickleDeniedError:
    pass
try:
    print("loaded", load_model()(torch.zeros(2)).tolist())
except picklegate.PickleDeniedError as error:
    print("DENIED", error.callsite, error.sha256)
"""


def test_the_lite_interpreter_loader_is_judged(run_python, tmp_path, canary):
    path, _ = canary
    run_python(MAKE, args=[str(tmp_path / "model.ptl"), str(path)], check=True)
    if path.exists():
        path.unlink()
    control = run_python(LOAD, check=True)
    assert path.exists(), "the control did not run the archive's __setstate__"
    path.unlink()
    env = {"PICKLEGATE_MODE": "enforce"}  # no manifest: every load is refused
    proc = run_python(LOAD, env=env, check=True)
    assert "not enforcing" not in proc.stdout, proc.stdout
    assert not path.exists(), f"an unlisted .ptl archive ran under enforce: {proc.stdout}"
    assert proc.stdout.startswith("DENIED"), proc.stdout + proc.stderr
    _, callsite, sha = proc.stdout.split()
    assert callsite == "__main__:load_model"
    # the same archive, listed, loads as it does without picklegate
    write_manifest(tmp_path / "listed.toml", (sha, callsite))
    env["PICKLEGATE_POLICY"] = str(tmp_path / "listed.toml")
    assert run_python(LOAD, env=env, check=True).stdout.splitlines()[-1] == control.stdout.splitlines()[-1] == "loaded [1.0, 1.0]"
