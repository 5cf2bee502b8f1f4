"""Red team 6, T2: torch finds a zip checkpoint's records case-insensitively (miniz), so a
checkpoint whose pickle is stored as ``archive/data.PKL`` loads as usual, but the scan looked only
at names ending in ``.pkl``: ``picklegate scan`` said "no pickle inside" and record mode wrote
``globals: []`` for a pickle that runs ``os.system``. (Under ``enforce`` the backstop still refused
the global, since freeze writes ``globals = []``; a reviewer reading the scan would not have seen
it.) Fixed: the scan reads ``.pkl`` and ``.npy`` members whatever their case."""

import io
import os
import pickle
import subprocess
import sys
import zipfile

import pytest

torch = pytest.importorskip("torch")


class Touch:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_scan_sees_a_pickle_stored_as_data_PKL(tmp_path):
    torch.save({"w": torch.zeros(3)}, tmp_path / "orig.pt")
    out = io.BytesIO()
    with zipfile.ZipFile(tmp_path / "orig.pt") as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/data.pkl"):
                z.writestr(info.filename[:-4] + ".PKL", pickle.dumps(Touch(tmp_path / "CANARY"), protocol=2))
            else:
                z.writestr(info.filename, data)
    (tmp_path / "evil.pt").write_bytes(out.getvalue())
    # torch reads data.PKL as its pickle (control: the unguarded load runs it)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert (tmp_path / "CANARY").exists()
    scan = subprocess.run([sys.executable, "-m", "picklegate", "scan", "evil.pt"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert "posix.system" in scan.stdout, scan.stdout
    assert "no pickle inside" not in scan.stdout
