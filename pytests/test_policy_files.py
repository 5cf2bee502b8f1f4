"""Malformed manifests fail with file:line:col (issue 2, acceptance 5), and the shipped
examples in policy-examples/ load and behave as their comments say."""

import hashlib
import pathlib
import pickle

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "policy-examples"
SHA = "ab" * 32

MISTAKES = {
    "unknown key": (f'version = 1\n[[allow]]\nsha256 = "{SHA}"\ncallsite = "a:b"\ncalsite = "x"\n', "5:1", "unknown field `calsite`"),
    "bad hex": ('version = 1\n[[allow]]\nsha256 = "' + "zz" * 32 + '"\ncallsite = "a:b"\n', "3:10", "hex"),
    "wrong length": ('version = 1\n[[allow]]\nsha256 = "abc"\ncallsite = "a:b"\n', "3:10", "found 3 characters"),
    "unknown version": ("version = 7\n", "1:11", "unknown manifest version 7"),
    "missing version": ("loaders = []\n", "1:1", "missing `version = 1`"),
    "toml syntax": ("version = 1\n[[allow]\n", "2:9", "expected `]`"),
    "wrong type": ('version = 1\n[[trust]]\ncallsite = "a.*"\nglobals = "os.*"\n', "4:11", "sequence"),
    "trust without globals": ('version = 1\n[[trust]]\ncallsite = "a.*"\nglobals = []\n', "4:11", "at least one global"),
    "missing callsite": (f'version = 1\n[[allow]]\nsha256 = "{SHA}"\n', "2:1", "callsite"),
    "empty callsite": (f'version = 1\n[[allow]]\nsha256 = "{SHA}"\ncallsite = ""\n', "4:12", "must not be empty"),
}


@pytest.mark.parametrize("kind", sorted(MISTAKES))
def test_malformed_manifest_names_file_line_and_column(kind, run_python, tmp_path):
    text, location, expected = MISTAKES[kind]
    manifest = tmp_path / "bad.toml"
    manifest.write_text(text)
    proc = run_python(
        """
        import sys, picklegate
        try:
            picklegate.install(policy=sys.argv[1])
        except picklegate.PolicyError as error:
            print(error)
            print(f"at {error.file}:{error.line}:{error.column}")
            sys.exit(2)
        """,
        args=[str(manifest)],
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.startswith(f"{manifest}:{location}"), proc.stdout
    assert expected.lower() in proc.stdout.lower(), proc.stdout
    # the location also as attributes, for a tool that points at the line
    assert proc.stdout.splitlines()[-1] == f"at {manifest}:{location}", proc.stdout


def test_missing_manifest_is_a_policy_error(run_python, tmp_path):
    proc = run_python(
        """
        import picklegate
        try:
            picklegate.install(policy="does-not-exist.toml")
        except picklegate.PolicyError as error:
            print(error)
            print(error.file, error.line, error.column)
        """,
        check=True,
    )
    assert proc.stdout.startswith("does-not-exist.toml: cannot read the pickle manifest")
    assert proc.stdout.splitlines()[-1] == "does-not-exist.toml None None"


def test_deny_all_example_refuses_everything(run_python):
    proc = run_python(
        f"""
        import pickle, picklegate
        picklegate.install(policy={str(EXAMPLES / 'deny-all.toml')!r})
        try:
            pickle.loads(pickle.dumps([1, 2, 3]))
        except picklegate.PickleDeniedError as error:
            print("DENIED", "not in the manifest" in str(error))
        """,
        check=True,
    )
    assert proc.stdout.strip() == "DENIED True"


def test_single_model_example_allows_its_hash_at_its_callsite_only(run_python, tmp_path):
    """The example with its placeholder hash replaced by a real model's, as its comment says."""
    model = pickle.dumps({"layer1.weight": [0.1, 0.2]})
    text = (EXAMPLES / "single-model.toml").read_text()
    placeholder = next(line.split('"')[1] for line in text.splitlines() if line.startswith("sha256"))
    (tmp_path / "pickles.toml").write_text(text.replace(placeholder, hashlib.sha256(model).hexdigest()))
    (tmp_path / "model.pkl").write_bytes(model)
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "serving.py").write_text(
        "import pickle\ndef load_model(path):\n    with open(path, 'rb') as f:\n        return pickle.load(f)\n"
        "def load_other(path):\n    with open(path, 'rb') as f:\n        return pickle.load(f)\n"
    )
    proc = run_python(
        """
        import picklegate
        picklegate.install(policy="pickles.toml")
        from myapp.serving import load_model, load_other
        print(load_model("model.pkl"))
        try:
            load_other("model.pkl")
        except picklegate.PickleDeniedError as error:
            print("DENIED", error.callsite)
        """,
        check=True,
    )
    assert proc.stdout.splitlines() == ["{'layer1.weight': [0.1, 0.2]}", "DENIED myapp.serving:load_other"]


def test_transport_trust_example_bounds_globals(run_python, canary):
    path, payload = canary
    proc = run_python(
        f"""
        import collections, io, pickle, sys, picklegate
        sys.modules["myapp"] = type(sys)("myapp")
        picklegate.install(policy={str(EXAMPLES / 'transport-trust.toml')!r})
        import multiprocessing.connection as mc
        a, b = mc.Pipe()
        a.send(["task", 1])
        print(b.recv())
        b.send_bytes({payload!r})
        try:
            a.recv()
        except picklegate.PickleDeniedError as error:
            print("DENIED", error.callsite)
        """,
        check=True,
    )
    lines = proc.stdout.splitlines()
    assert lines[0] == "['task', 1]"
    assert lines[1] == "DENIED multiprocessing.connection:_ConnectionBase.recv"
    assert not path.exists()
