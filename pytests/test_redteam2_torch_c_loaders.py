"""torch's private C loaders called directly (found while fixing red-team pass 2, A07): the lite
interpreter's and TorchScript's C++ entry points, by path and by bytes, run an archive's pickles and
its scripted `__setstate__` without Python's pickle. They are judged on the archive's sha256 like the
Python functions that call them.
"""

import pytest

from test_redteam2_lite_interpreter import MAKE

LOAD = """
import sys, torch, picklegate
how = sys.argv[1]

def load_model():
    if how == "lite-path":
        return torch._C._load_for_lite_interpreter("model.ptl", None)
    if how == "lite-bytes":
        return torch._C._load_for_lite_interpreter_from_buffer(open("model.ptl", "rb").read(), None)
    if how == "mobile-path":
        return torch._C._load_mobile_module_from_file("model.ptl")
    return torch._C.import_ir_module(torch._C.CompilationUnit(), "model.ptl", None, {}, False)

try:
    load_model()
    print("loaded")
except picklegate.PickleDeniedError as error:
    print("DENIED", error.callsite)
except Exception as error:
    print("ERROR", type(error).__name__)
"""


@pytest.mark.parametrize("how", ["lite-path", "lite-bytes", "ir-path"])
def test_torch_s_c_loaders_called_directly_are_judged(run_python, tmp_path, canary, how):
    path, _ = canary
    run_python(MAKE, args=[str(tmp_path / "model.ptl"), str(path)], check=True)
    if path.exists():
        path.unlink()
    control = run_python(LOAD, args=[how], check=True)
    assert path.exists() and control.stdout.strip() == "loaded", control.stdout + control.stderr
    path.unlink()
    proc = run_python(LOAD, args=[how], env={"PICKLEGATE_MODE": "enforce"}, check=True)
    assert not path.exists(), f"torch._C loader ({how}) ran an unlisted archive under enforce: {proc.stdout}"
    assert proc.stdout.split() == ["DENIED", "__main__:load_model"], proc.stdout + proc.stderr
