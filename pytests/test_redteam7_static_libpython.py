"""Red team 7 P3: a program with CPython linked into it statically, its symbols not exported (no
``-export-dynamic``; PyOxidizer-style single-file programs), started under ``PICKLEGATE_MODE=enforce``
with the preload. The preload finds CPython only by dynamic symbols (``PySys_AddAuditHook``) and
hooks only calls that go through the PLT: here it sees neither, stays invisible, and the program
unpickles a hostile pickle unguarded, without a word (not "refuses to run or says so loudly").
Inherent to a preload, like a fully static program (red team 3 A4): only ``install()`` or the
``.pth`` hook guard it."""

import os
import shutil
import subprocess

import pytest

from test_preload import preload_path

HOSTS = os.path.join(os.path.dirname(__file__), "hosts")
STATIC = "/usr/lib/python3.11/config-3.11-x86_64-linux-gnu/libpython3.11.a"
SCRIPT = """
import os, pickle, sys
class P:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[1],))
try:
    pickle.loads(pickle.dumps(P()))
    print("loaded")
except Exception as error:
    print("refused", type(error).__name__)
"""


@pytest.mark.xfail(strict=True, reason="red team 7 P3: CPython linked statically into a program without "
                   "exported symbols runs unguarded under the preload in enforce (open, inherent)")
def test_a_program_with_cpython_linked_in_unexported_is_guarded_or_refused(tmp_path):
    gcc = shutil.which("gcc")
    if gcc is None or not os.path.exists(STATIC):
        pytest.skip("gcc or Debian's static libpython3.11 is absent")
    host = tmp_path / "static_python"
    subprocess.run([gcc, "-w", "-no-pie", "-o", host, os.path.join(HOSTS, "redteam7_static_main.c"), STATIC,
                    "-lexpat", "-lz", "-lm", "-ldl", "-lpthread", "-lutil"], check=True)
    script, canary = tmp_path / "load.py", tmp_path / "CANARY"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PICKLEGATE_", "PYTHON"))}
    plain = subprocess.run([host, "-S", script, tmp_path / "plain"], capture_output=True, text=True, env=env,
                           timeout=120)
    assert plain.stdout == "loaded\n" and (tmp_path / "plain").exists(), plain.stderr
    env.update(LD_PRELOAD=preload_path(), PICKLEGATE_MODE="enforce")
    proc = subprocess.run([host, "-S", script, canary], capture_output=True, text=True, env=env, timeout=120)
    assert not canary.exists(), proc.stdout + proc.stderr
    assert proc.returncode == 78 or proc.stdout == "refused PickleDeniedError\n", proc.stdout + proc.stderr
