"""torch.package archives carry module source that their pickles import (issue 11 finding 5): the
archive is judged on its whole file's sha256, so an edited module inside it is refused (canary)."""

import hashlib
import textwrap
import zipfile

import pytest

from conftest import write_manifest

MAKE = """
import sys, torch.package
source = open(sys.argv[2]).read()
with torch.package.PackageExporter(sys.argv[1]) as exporter:
    exporter.save_source_string("mymodel.net", source)
    exporter.save_pickle("model", "model.pkl", __import__("importlib").import_module("mymodel.net").Net())
"""

def make_archive(run_python, tmp_path, name, source):
    (tmp_path / "mymodel").mkdir(exist_ok=True)
    (tmp_path / "mymodel" / "__init__.py").write_text("")
    (tmp_path / "mymodel" / "net.py").write_text("class Net:\n    size = 3\n")
    (tmp_path / f"{name}.py.txt").write_text(source)
    run_python(MAKE, args=[str(tmp_path / name), str(tmp_path / f"{name}.py.txt")], check=True)
    return tmp_path / name


LOAD = """
import sys, picklegate, torch.package
picklegate.install(policy="pickles.toml")
def serve(path):
    return torch.package.PackageImporter(path).load_pickle("model", "model.pkl")
try:
    print("loaded", serve(sys.argv[1]).size)
except picklegate.PickleDeniedError as error:
    print("denied", error.callsite, error.sha256)
"""


def test_an_archive_with_an_edited_module_is_refused(run_python, tmp_path):
    pytest.importorskip("torch")
    good = make_archive(run_python, tmp_path, "good.pt", "class Net:\n    size = 3\n")
    canary = tmp_path / "CANARY"
    evil = make_archive(run_python, tmp_path, "evil.pt", textwrap.dedent(f"""
        import os
        os.system("touch {canary}")
        class Net:
            size = 3
    """))
    (tmp_path / "mymodel" / "net.py").unlink()  # the loader imports from the archive only
    # What recording the good archive's pickle alone would list (judging the record, not the
    # archive, let the edited module run), and the archive itself.
    with zipfile.ZipFile(good) as z:
        record = z.read(next(n for n in z.namelist() if n.endswith("model/model.pkl")))
    with zipfile.ZipFile(evil) as z:
        assert z.read(next(n for n in z.namelist() if n.endswith("model/model.pkl"))) == record
    write_manifest(tmp_path / "pickles.toml", (hashlib.sha256(good.read_bytes()).hexdigest(), "__main__:serve"),
                   (hashlib.sha256(record).hexdigest(), "__main__:serve"))
    assert run_python(LOAD, args=[str(good)], check=True).stdout.split() == ["loaded", "3"]
    out = run_python(LOAD, args=[str(evil)], check=True).stdout.split()
    assert out == ["denied", "__main__:serve", hashlib.sha256(evil.read_bytes()).hexdigest()]
    assert not canary.exists()
