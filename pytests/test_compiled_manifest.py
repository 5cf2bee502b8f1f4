"""The compiled manifest (`picklegate compile`): the same decisions as the TOML it was compiled
from, and refused with a clear message, never used, once that TOML changes or the index is
damaged (issue 12)."""

import collections
import hashlib
import os
import pickle
import struct
import subprocess
import sys

import pytest

# Loads every kind of decision in one process and prints one line per load: allowed, refused for
# its sha256, refused for its callsite, refused by an entry's `globals`, admitted by a [[trust]]
# rule, and a canary payload.
DECISIONS = """
import collections, pickle, sys, picklegate

def load_model(data):
    return pickle.loads(data)

def load_elsewhere(data):
    return pickle.loads(data)

def receive(data):
    return pickle.loads(data)

picklegate.install(policy=sys.argv[1], mode="enforce")
files = dict(arg.split("=", 1) for arg in sys.argv[2:])
for name, loader in (("model", load_model), ("model", load_elsewhere), ("narrow", load_model),
                     ("unlisted", load_model), ("message", receive), ("canary", load_model)):
    data = open(files[name], "rb").read()
    try:
        print(name, loader.__name__, "LOADED", loader(data))
    except picklegate.PickleDeniedError as error:
        print(name, loader.__name__, "DENIED", str(error).replace(chr(10), " | "))
"""


@pytest.fixture
def deployment(tmp_path, canary):
    canary_path, payload = canary
    pickles = {
        "model": pickle.dumps({"weights": [0.5, 1.5]}),
        "narrow": pickle.dumps(collections.OrderedDict(a=collections.Counter("ab"))),
        "unlisted": pickle.dumps([1, 2, 3]),
        "message": pickle.dumps(("task", 7)),
        "canary": payload,
    }
    files = {}
    for name, data in pickles.items():
        files[name] = tmp_path / f"{name}.pkl"
        files[name].write_bytes(data)
    sha = {name: hashlib.sha256(data).hexdigest() for name, data in pickles.items()}
    # Filler first, so the workload's entries sit among many others in the index.
    text = "version = 1\n"
    for i in range(3000):
        filler = hashlib.sha256(i.to_bytes(4, "little")).hexdigest()
        text += f'\n[[allow]]\nsha256 = "{filler}"\ncallsite = "app.m{i % 50}:load_{i}"\nnote = "filler {i}"\n'
    text += f"""
[[allow]]
sha256 = "{sha['model']}"
callsite = "__main__:load_model"
note = "the model"

[[allow]]
sha256 = "{sha['narrow']}"
callsite = "__main__:load_*"
globals = ["collections.OrderedDict"]

[[trust]]
callsite = "__main__:receive"
globals = ["builtins.tuple"]
"""
    manifest = tmp_path / "pickles.toml"
    manifest.write_text(text)
    args = [f"{name}={path}" for name, path in files.items()]
    return manifest, args, canary_path


def picklegate_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "picklegate", *args], cwd=cwd, capture_output=True, text=True)


def test_compiled_manifest_decides_exactly_as_its_toml(deployment, run_python, tmp_path):
    manifest, args, canary_path = deployment
    proc = picklegate_cli("compile", str(manifest), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    index = tmp_path / "pickles.toml.idx"
    assert proc.stdout.startswith(f"{index}: 3002 [[allow]] entries"), proc.stdout
    with open(index, "rb") as f:
        assert f.read(8) == b"\x89PGIDX\r\n"

    from_toml = run_python(DECISIONS, args=[str(manifest), *args], check=True).stdout
    from_index = run_python(DECISIONS, args=[str(index), *args], check=True).stdout
    assert from_index == from_toml
    lines = from_index.splitlines()
    assert lines[0] == "model load_model LOADED {'weights': [0.5, 1.5]}"
    assert lines[1].startswith("model load_elsewhere DENIED") and "only for callsite(s) __main__:load_model" in lines[1]
    assert lines[2].startswith("narrow load_model DENIED") and "collections.Counter" in lines[2]
    assert f"{manifest}:" in lines[2], "refusals name the TOML's line, the file people edit"
    assert lines[3].startswith("unlisted load_model DENIED") and "not in the manifest" in lines[3]
    assert lines[4] == "message receive LOADED ('task', 7)"
    assert lines[5].startswith("canary load_model DENIED")
    assert not canary_path.exists()


def test_edited_toml_makes_the_index_refused_at_install(deployment, run_python, tmp_path):
    manifest, args, canary_path = deployment
    index = tmp_path / "compiled.idx"
    assert picklegate_cli("compile", str(manifest), "-o", str(index), cwd=tmp_path).returncode == 0
    # The operator revokes the model (edits the TOML) but forgets to compile again.
    manifest.write_text(manifest.read_text().replace('callsite = "__main__:load_model"', 'callsite = "__main__:retired"'))
    proc = run_python(
        """
        import sys, picklegate
        try:
            picklegate.install(policy=sys.argv[1], mode="enforce")
        except picklegate.PolicyError as error:
            print(error)
            sys.exit(2)
        """,
        args=[str(index)],
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"{index}: refused the compiled manifest: {manifest} has changed since it was compiled")
    assert f"run `picklegate compile {manifest}` again" in proc.stdout

    # Through the environment, the process does not start at all (fail closed), and says why.
    proc = run_python(DECISIONS, args=[str(index), *args], env={"PICKLEGATE_POLICY": str(index)})
    assert proc.returncode == 78, proc.stdout + proc.stderr
    assert "has changed since it was compiled" in proc.stderr
    assert "LOADED" not in proc.stdout
    assert not canary_path.exists()


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "toml removed"])
def test_damaged_index_is_refused(damage, deployment, run_python, tmp_path):
    manifest, _, _ = deployment
    assert picklegate_cli("compile", str(manifest), cwd=tmp_path).returncode == 0
    index = tmp_path / "pickles.toml.idx"
    data = index.read_bytes()
    if damage == "truncated":
        index.write_bytes(data[: len(data) // 2])
        expected = "the compiled manifest is truncated"
    elif damage == "flipped byte":
        index.write_bytes(data[:-40] + bytes([data[-40] ^ 1]) + data[-39:])
        expected = "corrupt compiled manifest (its sha256 does not match its contents)"
    else:
        os.remove(manifest)
        expected = f"cannot read {manifest}, the manifest it was compiled from"
    proc = run_python(
        """
        import pickle, sys, picklegate
        try:
            picklegate.install(policy=sys.argv[1], mode="enforce")
        except picklegate.PolicyError as error:
            print(error)
        """,
        args=[str(index)],
        check=True,
    )
    assert proc.stdout.startswith(f"{index}: refused the compiled manifest: {expected}"), proc.stdout


def test_compile_reports_a_bad_toml_by_line_and_writes_nothing(tmp_path):
    manifest = tmp_path / "bad.toml"
    manifest.write_text('version = 1\n[[allow]]\nsha256 = "abc"\ncallsite = "a:b"\n')
    proc = picklegate_cli("compile", str(manifest), cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"picklegate compile: {manifest}:3:10:"), proc.stderr
    assert not (tmp_path / "bad.toml.idx").exists()
    assert list(tmp_path.iterdir()) == [manifest], "no temporary file is left behind"


def test_verify_audits_an_index_against_its_toml(deployment, tmp_path):
    """An install checks that the index is intact and its TOML unchanged; `picklegate verify` also
    checks that the index holds that TOML's rules (an index with the right TOML sha256 written over
    other rules passes an install: the index must be protected like the TOML)."""
    manifest, _, _ = deployment
    index = tmp_path / "pickles.toml.idx"
    assert picklegate_cli("compile", str(manifest), cwd=tmp_path).returncode == 0
    model = tmp_path / "model.pkl"
    proc = picklegate_cli("verify", str(index), str(model), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{index}: valid, 3002 [[allow]] entries")
    assert "listed   " in proc.stdout and "__main__:load_model" in proc.stdout

    # The TOML loses the model's entry; the index keeps it but is given the new TOML's sha256.
    text = manifest.read_text().replace('callsite = "__main__:load_model"', 'callsite = "__main__:retired"')
    manifest.write_text(text)
    data = bytearray(index.read_bytes())
    data[16:48] = hashlib.sha256(text.encode()).digest()
    index.write_bytes(bytes(data))
    proc = picklegate_cli("verify", str(index), str(model), cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"picklegate verify: {index}: refused the compiled manifest: its rules are not those of {manifest}"), proc.stderr


def test_an_index_claiming_huge_tables_is_refused_without_allocating_them(run_python, tmp_path):
    """Red-team pass 2, A03(c): 124 bytes claiming 0x3fffffff allow records (about 80 GB of tables).
    Under a 4 GiB address-space limit an allocation sized by the counts aborts the process; the
    index must be refused with a PolicyError instead."""
    counts = struct.pack("<8I", 0x3FFFFFFF, 0, 0, 0, 0, 0, 0, 0)
    body_len = 32 + 0x3FFFFFFF * 64 + 4 * 2 + 4 * 0x3FFFFFFF + 4 * 2
    header = b"\x89PGIDX\r\n" + struct.pack("<II", 1, 0) + b"\0" * 64 + struct.pack("<Q", body_len)
    (tmp_path / "huge.idx").write_bytes(header + counts)
    script = (
        "import resource, picklegate\n"
        "resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))\n"
        "try:\n"
        "    picklegate.install(mode='enforce', policy='huge.idx')\n"
        "except picklegate.PolicyError as error:\n"
        "    print('refused', error)\n"
    )
    proc = run_python(script)
    assert proc.returncode == 0, proc.stderr[-500:]
    assert proc.stdout.startswith("refused") and "truncated (tables cut short)" in proc.stdout, proc.stdout
