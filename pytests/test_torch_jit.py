"""torch.jit.load runs a TorchScript archive's pickles in torch's C++ unpickler (and its
`__setstate__` code) without Python's pickle: it is judged on the whole file's sha256 at the
caller's callsite, as torch.load is (red-team S3)."""

import hashlib

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
torch.jit.save(torch.jit.script(model), sys.argv[1])
"""

LOAD = """
import sys, torch, picklegate

def load_model(how):
    if how == "path":
        return torch.jit.load("model.pt")
    with open("model.pt", "rb") as f:
        return torch.jit.load(f)

for how in ("path", "file"):
    try:
        print(how, "loaded", load_model(how)(torch.zeros(2)).tolist())
    except picklegate.PickleDeniedError as error:
        print(how, "DENIED", error.callsite)
"""


def test_torch_jit_load_is_judged_by_the_whole_file(run_python, tmp_path, canary):
    path, _ = canary
    run_python(MAKE, args=[str(tmp_path / "model.pt"), str(path)], check=True)
    if path.exists():
        path.unlink()  # the archive is made; only a load may create the canary from here
    control = run_python(LOAD, check=True)
    assert control.stdout.splitlines() == ["path loaded [1.0, 1.0]", "file loaded [1.0, 1.0]"], control.stderr
    assert path.exists(), "the control did not run the archive's __setstate__"
    path.unlink()
    write_manifest(tmp_path / "empty.toml")
    env = {"PICKLEGATE_POLICY": str(tmp_path / "empty.toml"), "PICKLEGATE_MODE": "enforce"}
    proc = run_python(LOAD, env=env, check=True)
    assert proc.stdout.splitlines() == ["path DENIED __main__:load_model", "file DENIED __main__:load_model"], proc.stderr
    assert not path.exists(), "torch.jit.load ran an unlisted archive under enforce"
    # listed by sha256 at the caller's callsite, it loads as without picklegate
    sha = hashlib.sha256((tmp_path / "model.pt").read_bytes()).hexdigest()
    write_manifest(tmp_path / "listed.toml", (sha, "__main__:load_model"))
    env["PICKLEGATE_POLICY"] = str(tmp_path / "listed.toml")
    proc = run_python(LOAD, env=env, check=True)
    assert proc.stdout.splitlines() == ["path loaded [1.0, 1.0]", "file loaded [1.0, 1.0]"], proc.stderr
    assert path.exists()  # the listed archive ran its own __setstate__
    path.unlink()
