"""`picklegate hash` prints what sha256sum prints, and fails clearly on a missing file."""

import hashlib
import subprocess
import sys


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "picklegate", *args], capture_output=True, text=True)


def test_hash_matches_sha256sum(tmp_path):
    small = tmp_path / "small.pkl"
    small.write_bytes(b"\x80\x04K\x01.")
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * 20000)
    proc = run_cli("hash", str(small), str(big))
    assert proc.returncode == 0, proc.stderr
    expected = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p}\n" for p in (small, big))
    assert proc.stdout == expected
    sha256sum = subprocess.run(["sha256sum", str(small), str(big)], capture_output=True, text=True)
    assert proc.stdout == sha256sum.stdout


def test_hash_of_missing_file_names_it(tmp_path):
    proc = run_cli("hash", str(tmp_path / "nope.pkl"))
    assert proc.returncode == 1
    assert "nope.pkl" in proc.stderr


def test_console_script_is_installed():
    import shutil

    exe = shutil.which("picklegate") or str(__import__("pathlib").Path(sys.executable).with_name("picklegate"))
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "hash" in proc.stdout
