"""Code inside the process tries to undo picklegate after install: ``tamper_child.py WORKDIR``.
Each attempt loads a canary payload; prints one JSON line: attempt -> outcome, canary."""

import _pickle
import asyncio
import copy
import hashlib
import importlib
import io
import json
import os
import pickle
import sys
import threading

WORK = sys.argv[1]
os.chdir(WORK)

# References an attacker saved before install.
SAVED = {
    "pickle.loads": pickle.loads, "pickle.load": pickle.load, "pickle.Unpickler": pickle.Unpickler,
    "_pickle.loads": _pickle.loads, "_pickle.Unpickler": _pickle.Unpickler,
    "pickle._Unpickler.load": pickle._Unpickler.load, "pickle._loads": pickle._loads,
}
BENIGN = pickle.dumps({"ok": [1, 2]}, protocol=4)


def payload(name):
    canary = os.path.join(WORK, "canary-" + name)
    return b"cposix\nsystem\n(S'touch " + canary.encode() + b"'\ntR."


with open("pickles.toml", "w") as f:
    f.write(f'version = 1\n[[allow]]\nsha256 = "{hashlib.sha256(BENIGN).hexdigest()}"\ncallsite = "__main__:*"\n')
with open("open.toml", "w") as f:
    f.write(f'version = 1\n[[allow]]\nsha256 = "{hashlib.sha256(payload("install-off")).hexdigest()}"\ncallsite = "*"\n')

import picklegate  # noqa: E402
from picklegate import _core, _interpose  # noqa: E402

picklegate.install(policy="pickles.toml", mode="enforce")
ATTEMPTS = {}


def attempt(fn):
    ATTEMPTS[fn.__name__.replace("_", "-")] = fn
    return fn


@attempt
def restore_saved_originals(data):
    pickle.loads, pickle.load, pickle.Unpickler = SAVED["pickle.loads"], SAVED["pickle.load"], SAVED["pickle.Unpickler"]
    _pickle.loads, _pickle.Unpickler = SAVED["_pickle.loads"], SAVED["_pickle.Unpickler"]
    pickle._Unpickler.load = SAVED["pickle._Unpickler.load"]
    try:
        return pickle.loads(data)
    finally:
        _interpose.activate()


@attempt
def restored_pure_python_load(data):
    pickle._Unpickler.load = SAVED["pickle._Unpickler.load"]
    try:
        return pickle._Unpickler(io.BytesIO(data)).load()
    finally:
        _interpose.activate()


@attempt
def importlib_reload_pickle(data):
    return importlib.reload(pickle).loads(data)


@attempt
def reloaded_pure_python_unpickler(data):
    return importlib.reload(pickle)._Unpickler(io.BytesIO(data)).load()


@attempt
def del_sys_modules_and_reimport(data):
    del sys.modules["pickle"]
    fresh = importlib.import_module("pickle")
    return fresh.load(io.BytesIO(data))


@attempt
def reimported_pure_python_loads(data):
    del sys.modules["pickle"]
    return importlib.import_module("pickle")._loads(data)


@attempt
def call_pickle_c_module_directly(data):
    return _pickle.loads(data)


@attempt
def original_c_unpickler_class(data):
    original = [c for c in pickle.Unpickler.__mro__ if c.__module__ == "_pickle"][-1]  # the C class, whatever wraps it
    return original(io.BytesIO(data)).load()


@attempt
def picklegates_own_saved_original(data):
    return _interpose._ORIGINAL_LOADS(data)


@attempt
def replace_the_decision_function(data):
    saved = _core.guarded_load
    _core.guarded_load = lambda data, source, run, unpickler=None: run()
    try:
        return pickle.loads(data)
    finally:
        _core.guarded_load = saved


@attempt
def subclass_overriding_find_class(data):
    class Lenient(pickle.Unpickler):
        def find_class(self, module, name):
            return getattr(importlib.import_module(module), name)

    return Lenient(io.BytesIO(data)).load()


@attempt
def subclass_of_c_unpickler_overriding_find_class(data):
    class Lenient(_pickle.Unpickler):
        def find_class(self, module, name):
            return getattr(importlib.import_module(module), name)

    return Lenient(io.BytesIO(data)).load()


@attempt
def forge_a_token(data):
    with picklegate.no_pickles():
        for forge in (lambda: picklegate.Token(), lambda: object.__new__(picklegate.Token)):
            try:
                forge()
                raise AssertionError("a Token was constructed outside no_pickles()")
            except TypeError:
                pass
        impostor = type("Token", (), {"__repr__": lambda self: "<picklegate.Token #1 (open)>"})()
        with picklegate.allow_pickles(impostor):
            return pickle.loads(data)


@attempt
def copy_or_pickle_a_token(data):
    with picklegate.no_pickles() as token:
        for clone in (copy.copy, copy.deepcopy, lambda t: pickle.loads(pickle.dumps(t))):
            try:
                twin = clone(token)
            except (TypeError, pickle.PicklingError):
                continue
            with picklegate.allow_pickles(twin):
                return pickle.loads(data)
    raise TypeError("the token could not be copied")


@attempt
def reuse_a_token_after_its_block(data):
    with picklegate.no_pickles() as token:
        pass
    with picklegate.no_pickles():
        with picklegate.allow_pickles(token):
            return pickle.loads(data)


@attempt
def steal_a_token_across_threads(data):
    box, errors = {}, []
    with picklegate.no_pickles() as token:
        def thief():
            try:
                with picklegate.no_pickles():
                    with picklegate.allow_pickles(token):
                        box["value"] = pickle.loads(data)
            except BaseException as error:  # noqa: BLE001 - reported to the main thread
                errors.append(error)
        thread = threading.Thread(target=thief)
        thread.start()
        thread.join()
    if errors:
        raise errors[0]
    return box["value"]


@attempt
def steal_a_token_across_asyncio_tasks(data):
    async def main():
        with picklegate.no_pickles() as token:
            async def thief():
                with picklegate.allow_pickles(token):
                    return pickle.loads(data)
            return await asyncio.create_task(thief())
    return asyncio.run(main())


@attempt
def library_calls_install_off(data):
    picklegate.install(mode="off")
    picklegate.install(policy="open.toml", mode="warn")
    _core.configure("off", None, "implicit")
    if picklegate.state()[0] != "enforce":
        raise AssertionError(f"install(mode='off') lowered the mode: {picklegate.state()}")
    return pickle.loads(data)


results = {}
for name, fn in ATTEMPTS.items():
    data = payload(name) if name != "library-calls-install-off" else payload("install-off")
    try:
        fn(data)
        outcome = "loaded"
    except BaseException as error:  # noqa: BLE001
        outcome = type(error).__name__
    canary = "install-off" if name == "library-calls-install-off" else name
    results[name] = {"outcome": outcome, "canary": os.path.exists(os.path.join(WORK, "canary-" + canary))}
class Lenient(pickle.Unpickler):
    def find_class(self, module, name):
        return getattr(importlib.import_module(module), name)


# find_class overridden without super() raises no audit event: the listed bytes load through it,
# so the refusal above came from the hash, not from the backstop.
results["subclass-loads-listed-pickle"] = {"outcome": repr(Lenient(io.BytesIO(BENIGN)).load()), "canary": False}
# The guard still stands after every attempt: the listed pickle loads, the payload does not.
results["benign-still-loads"] = {"outcome": repr(pickle.loads(BENIGN)), "canary": False}
print(json.dumps(results))
