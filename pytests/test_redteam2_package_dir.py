"""Red-team pass 2, A08 (FAILS on main at the time of writing: edited module source runs under enforce).

`torch.package.PackageImporter` also opens a package unzipped into a directory (DirectoryReader).
picklegate judges an archive *file* on its whole sha256 (issue 11 finding 5), but its wrapper skips a
directory (`_loaders._patch_torch_package`: `not os.path.isdir(path)`): only the pickle record is
judged on its own bytes, and the module source it imports from the directory is never hashed. The
operator lists the reviewed package; an attacker who can write the directory edits `mymodel.py`.
Fixed: a directory is read whole into an archive and judged on that archive's sha256 (every file,
source included), and the importer reads only those bytes.
"""

import hashlib
import zipfile

from conftest import write_manifest

MAKE = """
import sys, torch.package
with torch.package.PackageExporter(sys.argv[1]) as exporter:
    exporter.save_source_string("mymodel", "class Net:\\n    size = 3\\n")
    exporter.save_pickle("model", "model.pkl", __import__("importlib").import_module("mymodel").Net())
"""

LOAD = """
import sys, picklegate, torch.package
picklegate.install(mode="enforce", policy="pickles.toml")
try:
    print("loaded", torch.package.PackageImporter(sys.argv[1]).load_pickle("model", "model.pkl").size)
except picklegate.PickleDeniedError as error:
    print("denied", error.callsite, error.sha256)
"""

EDITED = """
for c in ().__class__.__base__.__subclasses__():
    if c.__name__ == "_wrap_close":
        c.__init__.__globals__["system"]("touch {canary}")
        break
class Net:
    size = 3
"""


def test_a_package_directory_s_module_source_is_judged(run_python, tmp_path, canary):
    path, _ = canary
    (tmp_path / "mymodel.py").write_text("class Net:\n    size = 3\n")  # for the exporter's import
    run_python(MAKE, args=[str(tmp_path / "pkg.zip")], check=True)
    with zipfile.ZipFile(tmp_path / "pkg.zip") as archive:
        archive.extractall(tmp_path / "unzipped")
    root = next((tmp_path / "unzipped").iterdir())
    write_manifest(tmp_path / "pickles.toml")
    probe = run_python(LOAD, args=[str(root)], check=True)
    denied, callsite, sha = probe.stdout.split()
    assert denied == "denied" and callsite == "__main__:<module>", probe.stdout
    assert sha != hashlib.sha256((root / "model" / "model.pkl").read_bytes()).hexdigest()
    write_manifest(tmp_path / "pickles.toml", (sha, callsite))   # the reviewed package, listed
    assert run_python(LOAD, args=[str(root)], check=True).stdout.split() == ["loaded", "3"]
    (root / "mymodel.py").write_text(EDITED.format(canary=path))  # the attacker edits the source
    proc = run_python(LOAD, args=[str(root)], check=True)
    assert not path.exists(), f"edited module source in a package directory ran under enforce: {proc.stdout}"
    assert proc.stdout.split()[0] == "denied", proc.stdout + proc.stderr


READER_LOAD = """
import sys, picklegate, torch, torch.package
picklegate.install(mode="enforce", policy="pickles.toml")
try:
    reader = torch._C.PyTorchFileReader(sys.argv[1])
    print("loaded", torch.package.PackageImporter(reader).load_pickle("model", "model.pkl").size)
except picklegate.PickleDeniedError as error:
    print("denied", error.callsite, error.sha256)
"""


def test_a_package_given_as_a_file_reader_is_judged_whole(run_python, tmp_path, canary):
    """Red-team pass 2, A08b: PackageImporter(torch._C.PyTorchFileReader(path)) skipped the
    archive's hash as the directory did; its records are now judged as one archive."""
    path, _ = canary
    (tmp_path / "mymodel.py").write_text("class Net:\n    size = 3\n")
    run_python(MAKE, args=[str(tmp_path / "pkg.zip")], check=True)
    write_manifest(tmp_path / "pickles.toml")
    denied, callsite, sha = run_python(READER_LOAD, args=["pkg.zip"], check=True).stdout.split()
    assert denied == "denied" and callsite == "__main__:<module>"
    write_manifest(tmp_path / "pickles.toml", (sha, callsite))   # the reviewed package, listed
    assert run_python(READER_LOAD, args=["pkg.zip"], check=True).stdout.split() == ["loaded", "3"]
    with zipfile.ZipFile(tmp_path / "pkg.zip") as original, zipfile.ZipFile(tmp_path / "edited.zip", "w") as edited:
        for info in original.infolist():
            data = original.read(info)
            if info.filename.endswith("/mymodel.py"):
                data = EDITED.format(canary=path).encode()
            edited.writestr(info, data)
    proc = run_python(READER_LOAD, args=["edited.zip"], check=True)
    assert not path.exists(), f"edited module source behind a PyTorchFileReader ran under enforce: {proc.stdout}"
    assert proc.stdout.split()[0] == "denied", proc.stdout + proc.stderr
