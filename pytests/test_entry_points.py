"""Every way a process can unpickle is decided before the payload runs (issue 2, acceptance 2)."""

import hashlib
import pickle

import pytest

from conftest import write_manifest

# Each loader is defined in the child script; the canary payload is in PAYLOAD.
LOADERS = {
    "pickle.loads": "pickle.loads(PAYLOAD)",
    "pickle.load": "pickle.load(io.BytesIO(PAYLOAD))",
    "pickle.load(file)": "pickle.load(open('payload.pkl', 'rb'))",
    "pickle.Unpickler.load": "pickle.Unpickler(open('payload.pkl', 'rb')).load()",
    "_pickle.loads": "_pickle.loads(PAYLOAD)",
    "_pickle.Unpickler.load": "_pickle.Unpickler(io.BytesIO(PAYLOAD)).load()",
    "pickle._loads": "pickle._loads(PAYLOAD)",
    "pickle._load": "pickle._load(io.BytesIO(PAYLOAD))",
    "pickle._Unpickler.load": "pickle._Unpickler(io.BytesIO(PAYLOAD)).load()",
    "captured _pickle.loads": "SAVED_LOADS(PAYLOAD)",
    "captured pickle.load": "SAVED_LOAD(io.BytesIO(PAYLOAD))",
    "subclass defined before install": "EarlyUnpickler(io.BytesIO(PAYLOAD)).load()",
    "subclass overriding find_class before install": "FindClassUnpickler(io.BytesIO(PAYLOAD)).load()",
    "python subclass defined before install": "EarlyPyUnpickler(io.BytesIO(PAYLOAD)).load()",
    "subclass resolving names itself before install": "SelfResolvingUnpickler(io.BytesIO(PAYLOAD)).load()",
    "restored pickle.loads": "restore_and_load()",
}

CHILD = """
import _pickle, io, pickle, sys
from pickle import loads as SAVED_LOADS, load as SAVED_LOAD

class EarlyUnpickler(pickle.Unpickler):
    pass

class FindClassUnpickler(_pickle.Unpickler):
    def find_class(self, module, name):
        return super().find_class(module, name)

class EarlyPyUnpickler(pickle._Unpickler):
    pass

class SelfResolvingUnpickler(_pickle.Unpickler):
    def find_class(self, module, name):  # no super(): no audit event for the backstop
        import importlib
        return getattr(importlib.import_module(module), name)

ORIGINAL = pickle.loads
PAYLOAD = open('payload.pkl', 'rb').read()

def restore_and_load():
    pickle.loads = ORIGINAL
    return pickle.loads(PAYLOAD)

import picklegate
picklegate.install(policy=sys.argv[1] if len(sys.argv) > 1 else None, mode="enforce")
try:
    {load}
except picklegate.PickleDeniedError as error:
    print("DENIED", error.callsite)
    sys.exit(3)
print("LOADED")
"""


@pytest.mark.parametrize("entry", sorted(LOADERS))
def test_canary_payload_is_refused_in_enforce(entry, canary, run_python, tmp_path):
    path, payload = canary
    (tmp_path / "payload.pkl").write_bytes(payload)
    benign = pickle.dumps({"weights": [1.0, 2.0]})
    manifest = write_manifest(tmp_path / "pickles.toml", (hashlib.sha256(benign).hexdigest(), "*"))
    proc = run_python(CHILD.format(load=LOADERS[entry]), args=[str(manifest)])
    assert proc.returncode == 3, proc.stderr
    assert "DENIED" in proc.stdout
    assert not path.exists(), "the payload ran"


@pytest.mark.parametrize("entry", sorted(LOADERS))
def test_no_policy_refuses_even_a_harmless_pickle(entry, run_python, tmp_path):
    """enforce with no manifest is the global no-pickle mode: every load, globals or not."""
    (tmp_path / "payload.pkl").write_bytes(pickle.dumps(__import__("collections").OrderedDict(a=1)))
    proc = run_python(CHILD.format(load=LOADERS[entry]))
    assert proc.returncode == 3, proc.stdout + proc.stderr


def test_without_picklegate_the_canary_does_run(canary, run_python, tmp_path):
    """The control: the payload used above really executes when nothing guards the load."""
    path, payload = canary
    (tmp_path / "payload.pkl").write_bytes(payload)
    run_python("import pickle; pickle.loads(open('payload.pkl', 'rb').read())", check=True)
    assert path.exists()
