"""`picklegate scan` (issue 4, acceptance 3): the globals of pickles of every protocol and of the
files that carry them (torch zip, joblib plain and compressed, .npy/.npz), found without running
anything; broken input is an error naming where it broke."""

import collections
import fractions
import hashlib
import json
import pathlib
import pickle
import subprocess
import sys
import zipfile

import joblib
import numpy
import pytest

EXPECTED = ["collections.OrderedDict", "fractions.Fraction"]


def sample_object():
    return {"table": collections.OrderedDict(a=fractions.Fraction(1, 3)), "list": [1, 2.5, "x", b"y"]}


def scan(*args):
    proc = subprocess.run([sys.executable, "-m", "picklegate", "scan", *map(str, args)], capture_output=True, text=True)
    return proc


def scan_json(*files, allow=()):
    args = [*files, "--json"]
    for pattern in allow:
        args += ["--allow", pattern]
    proc = scan(*args)
    document = json.loads(proc.stdout)
    assert document["schema"] == "picklegate-scan/1"
    return proc.returncode, document["files"]


@pytest.mark.parametrize("protocol", range(6))
def test_plain_pickles_of_every_protocol(tmp_path, protocol):
    path = tmp_path / f"p{protocol}.pkl"
    path.write_bytes(pickle.dumps(sample_object(), protocol=protocol))
    status, [summary] = scan_json(path, allow=["collections.*", "fractions.Fraction", "_codecs.encode"])
    assert status == 0, summary
    assert summary["format"] == "pickle" and summary["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    [part] = summary["parts"]
    assert part["protocol"] == protocol
    assert [g for g in part["globals"] if g in EXPECTED] == EXPECTED
    assert part["risky_opcodes"]["REDUCE"] >= 1


def test_review_block_and_allowlist_verdicts(tmp_path):
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps({"t": collections.OrderedDict(), "p": pathlib.PurePosixPath("x")}, protocol=4))
    review = scan(path)
    assert review.returncode == 1
    lines = review.stdout.splitlines()
    assert lines[0] == str(path)
    assert lines[1] == f"  pickle, {path.stat().st_size} B, protocol 4"
    assert lines[2] == f"  sha256 {hashlib.sha256(path.read_bytes()).hexdigest()}"
    assert lines[3].startswith("  verdict: REVIEW")
    posix_path = f"{pathlib.PurePosixPath.__module__}.PurePosixPath"  # pathlib._local on 3.13
    assert f"  unknown (1): {posix_path}" in lines and "  data (1): collections.OrderedDict" in lines
    allowed = scan(path, "--allow", posix_path)
    assert allowed.returncode == 0 and "verdict: data" in allowed.stdout
    # '*' does not span the dot of a dotted attribute name, as in manifests.
    sneaky = tmp_path / "sneaky.pkl"
    sneaky.write_bytes(b"\x80\x04\x8c\x0bcollections\x8c\tos.system\x93)R.")
    status, [summary] = scan_json(sneaky, allow=["collections.*"])
    assert status == 1 and summary["verdict"] == "code"


def test_payload_is_code_and_checkpoint_is_data(tmp_path):
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(b"cposix\nsystem\n(S'touch CANARY'\ntR.")
    proc = scan(evil)
    assert proc.returncode == 1
    assert "verdict: CODE" in proc.stdout and "posix.system: os's implementation on Linux" in proc.stdout
    _, [summary] = scan_json(evil)
    assert [(g["name"], g["class"]) for g in summary["globals"]] == [("posix.system", "code")]


def test_output_wraps_to_the_terminal(tmp_path):
    path = tmp_path / "many.pkl"
    path.write_bytes(pickle.dumps([pathlib.PurePosixPath, pathlib.PureWindowsPath, pathlib.Path, fractions.Fraction,
                                   collections.OrderedDict, collections.Counter, collections.deque], protocol=4))
    proc = subprocess.run([sys.executable, "-m", "picklegate", "scan", str(path)], capture_output=True, text=True,
                          env={**__import__("os").environ, "COLUMNS": "50"})
    lines = [line for line in proc.stdout.splitlines() if not line.startswith((str(tmp_path), "  sha256 "))]
    assert all(len(line) <= 50 for line in lines) and "  data (4): collections.Counter," in lines, proc.stdout


def test_torch_zip_checkpoint_made_by_hand(tmp_path):
    # torch is not in the test environment yet (issue 5 adds it): this zip has torch.save's layout.
    payload = (b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01"
               b"ctorch._utils\n_rebuild_tensor_v2\nq\x02)Rq\x03\x86q\x04.")
    path = tmp_path / "model.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/data/0", b"\x00" * 64)
        archive.writestr("archive/version", "3\n")
    status, [summary] = scan_json(path)
    assert status == 0 and summary["verdict"] == "data"
    assert summary["format"] == "torch zip"
    [part] = summary["parts"]
    assert part["name"] == "archive/data.pkl"
    assert part["globals"] == ["collections.OrderedDict", "torch._utils._rebuild_tensor_v2"]


def test_real_torch_save(tmp_path):
    try:
        import torch
    except ImportError:
        pytest.fail("torch is not installed: run `bash scripts/test` (it installs `pip install .[test]`)")
    path = tmp_path / "real.pt"
    torch.save({"w": torch.zeros(2)}, path)
    status, [summary] = scan_json(path)
    assert status == 0 and (summary["format"], summary["verdict"]) == ("torch zip", "data")
    assert "torch._utils._rebuild_tensor_v2" in summary["parts"][0]["globals"]
    torch.save(torch.nn.Linear(2, 1), tmp_path / "module.pt")
    status, [summary] = scan_json(tmp_path / "module.pt")
    assert status == 1 and summary["verdict"] == "unknown"
    assert {"name": "torch.nn.modules.linear.Linear", "class": "unknown"}.items() <= summary["globals"][0].items()


@pytest.mark.parametrize("compress, fmt", [
    (0, "pickle"), (("zlib", 3), "joblib zlib"), (("gzip", 3), "joblib gzip"), (("bz2", 3), "joblib bz2"),
    (("lzma", 3), "joblib lzma"), (("xz", 3), "joblib xz"),
])
def test_joblib_dump_plain_and_compressed(tmp_path, compress, fmt):
    path = tmp_path / "model.joblib"
    joblib.dump(sample_object(), path, compress=compress)
    status, [summary] = scan_json(path, allow=["collections.*", "fractions.*"])
    assert status == 0, summary
    assert summary["format"] == fmt
    assert summary["parts"][0]["globals"] == EXPECTED


@pytest.mark.parametrize("compress", [0, ("zlib", 3), ("xz", 3)])
def test_joblib_numpy_arrays_are_stepped_over(tmp_path, compress):
    # joblib writes each array's raw bytes (or, for object arrays, a nested pickle) inside its
    # pickle stream; the globals after the arrays and inside the object array must be found.
    path = tmp_path / "arrays.joblib"
    objects = numpy.array([fractions.Fraction(1, 3), None], dtype=object)
    joblib.dump({"w": numpy.arange(1000.0).reshape(10, 100), "i": numpy.arange(7, dtype="int16"),
                 "o": objects, "after": collections.OrderedDict()}, path, compress=compress)
    status, [summary] = scan_json(path)
    assert status == 0 and summary["verdict"] == "data", summary
    found = summary["parts"][0]["globals"]
    for expected in ["joblib.numpy_pickle.NumpyArrayWrapper", "fractions.Fraction", "collections.OrderedDict"]:
        assert expected in found


def test_joblib_wrapper_used_oddly_is_an_error(tmp_path):
    path = tmp_path / "odd.joblib"
    path.write_bytes(b"\x80\x04\x8c\x13joblib.numpy_pickle\x8c\x11NumpyArrayWrapper\x93)R.")
    status, [summary] = scan_json(path, allow=["*"])
    assert status == 1 and "NumpyArrayWrapper used other than as joblib writes it" in summary["error"]
    assert summary["verdict"] == "error" and summary["complete"] is False


def test_numpy_object_arrays_in_npy_and_npz(tmp_path):
    objects = numpy.array([collections.OrderedDict(a=1), fractions.Fraction(1, 3)], dtype=object)
    numpy.save(tmp_path / "objects.npy", objects, allow_pickle=True)
    status, [summary] = scan_json(tmp_path / "objects.npy", allow=["numpy.**", "collections.*", "fractions.*"])
    assert status == 0, summary
    assert summary["format"] == "npy"
    globals_found = summary["parts"][0]["globals"]
    assert set(EXPECTED) <= set(globals_found) and any(g.startswith("numpy.") for g in globals_found)

    numpy.savez(tmp_path / "mixed.npz", numbers=numpy.arange(3), objects=objects)
    numpy.save(tmp_path / "numbers.npy", numpy.arange(3))
    status, (npz, numbers) = scan_json(tmp_path / "mixed.npz", tmp_path / "numbers.npy")
    assert npz["format"] == "npz" and [p["name"].split(" ")[0] for p in npz["parts"]] == ["objects.npy"]
    assert set(EXPECTED) <= set(npz["parts"][0]["globals"])
    assert numbers["parts"] == [] and numbers["verdict"] == "none"


def test_truncated_and_garbage_input_are_errors(tmp_path):
    data = pickle.dumps(sample_object(), protocol=2)
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(data[:40])
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\xff\xfe not a pickle")
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    status, summaries = scan_json(truncated, garbage, empty, tmp_path / "missing.pkl")
    assert status == 1 and [s["verdict"] for s in summaries] == ["error"] * 4
    errors = [s["error"] for s in summaries]
    assert errors[0].startswith(f"{truncated}: truncated pickle: input ends inside") and "at offset" in errors[0]
    assert errors[1] == f"{garbage}: not a pickle: unknown opcode 0xff at offset 0"
    assert errors[2].startswith(f"{empty}: truncated pickle")
    assert "missing.pkl: No such file" in errors[3]
    # where each error is, kept apart from the message (a file that cannot be opened has no parts)
    assert summaries[1]["error_at"] == {"part": "", "offset": 0, "problem": "not a pickle: unknown opcode 0xff at offset 0"}
    assert summaries[0]["error_at"]["part"] == "" and summaries[0]["error_at"]["offset"] >= 2
    assert "error_at" not in summaries[3]
    # a file read only in part is never clean: what came before the break is still shown
    after = tmp_path / "after.pkl"
    after.write_bytes(pickle.dumps(collections.OrderedDict(), protocol=2) + b"\x00junk")
    status, [summary] = scan_json(after)
    assert status == 1 and summary["verdict"] == "error" and "pickle at offset" in summary["error"]
    assert summary["error_at"]["part"].startswith("pickle at offset ") and summary["error_at"]["offset"] == 0
    assert [g["name"] for g in summary["globals"]] == ["collections.OrderedDict"]
    assert "verdict: ERROR" in scan(after).stdout


def test_directories_are_walked_and_formats_told_by_content(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "weights.bin").write_bytes(pickle.dumps(collections.OrderedDict(), protocol=2))
    numpy.save(tmp_path / "no-extension", numpy.arange(3))
    (tmp_path / "no-extension.npy").rename(tmp_path / "array")
    (tmp_path / "config.json").write_text('{"not": "a pickle"}')
    (tmp_path / "LICENSE").write_text("MIT License\n\nCopyright (c) 2026\n")
    (tmp_path / "model.safetensors").write_bytes(b"\x98\x00\x00\x00\x00\x00\x00\x00{}")
    status, summaries = scan_json(tmp_path)
    assert status == 0
    assert [(pathlib.Path(s["file"]).name, s["format"]) for s in summaries] == [("array", "npy"), ("weights.bin", "pickle")]
    proc = scan(tmp_path)
    assert proc.stdout.rstrip().endswith("2 files: 1 data, 1 none; 3 files skipped (not pickles)")
    document = json.loads(scan(tmp_path, "--json").stdout)
    assert sorted(pathlib.Path(p).name for p in document["skipped_not_pickles"]) == ["LICENSE", "config.json", "model.safetensors"]
    # a broken pickle that names a global before it breaks is never skipped
    (tmp_path / "notes.txt").write_bytes(b"cos\nsystem\n(S'x'\ntR\x00")
    status, summaries = scan_json(tmp_path)
    assert status == 1 and [s["verdict"] for s in summaries if s["file"].endswith("notes.txt")] == ["code"]
    assert proc.stderr == "", "no progress bar when stderr is not a terminal"
    # named explicitly, a file that is no pickle is an error
    assert scan_json(tmp_path / "config.json")[1][0]["verdict"] == "error"


def test_progress_bar_only_on_a_terminal(tmp_path):
    import os
    import pty

    for index in range(3):
        (tmp_path / f"{index}.pkl").write_bytes(pickle.dumps([index], protocol=4))
    master, slave = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "picklegate", "scan", str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=slave, text=True)
        os.close(slave)
        shown = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the terminal's other end is closed: all of it was read
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(master)
    assert proc.returncode == 0
    assert b"scanning [" in shown and b"3/3 files" in shown
    assert "scanning" not in proc.stdout
