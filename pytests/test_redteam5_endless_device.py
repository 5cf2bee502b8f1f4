"""Red team 5 E9: a file object over a device that says it is seekable but never ends.

``open("/dev/zero", "rb").seekable()`` is true, so picklegate read such a file "whole" (to its
end) before judging it: it never ends, and the load grew memory until the system refused it (or
the process was killed), where the unguarded load fails at once ("invalid load key"). A file
object whose descriptor is not a regular file is now read as a stream, only as far as the
pickle goes, as a pipe is."""

import os

import pytest

from conftest import write_manifest

CHILD = """
import pickle, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))   # never the whole machine
import picklegate
picklegate.install(policy="pickles.toml", mode="enforce")
loads = {
    "pickle.load": lambda f: pickle.load(f),
    "Unpickler": lambda f: pickle.Unpickler(f).load(),
    "_Unpickler": lambda f: pickle._Unpickler(f).load(),
}
for name, load in loads.items():
    with open("/dev/zero", "rb") as f:
        try:
            load(f)
        except pickle.UnpicklingError as e:
            print(name, "UnpicklingError")
        except BaseException as e:
            print(name, type(e).__name__, e)
"""


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_an_endless_device_fails_at_once_as_without_picklegate(run_python, tmp_path):
    write_manifest(tmp_path / "pickles.toml", ("0" * 64, "__main__:*"))
    proc = run_python(CHILD, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"{n} UnpicklingError" for n in ("pickle.load", "Unpickler", "_Unpickler")]
