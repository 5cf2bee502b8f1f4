"""Runs the whole corpus in one process: ``child.py WORKDIR enforce|control``. Under ``enforce``
the manifest lists only benign pickles; it prints one JSON line: technique -> outcome, canary."""

import copyreg
import importlib
import json
import os
import pickle
import sys
import textwrap
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import payloads  # noqa: E402

WORK, MODE = sys.argv[1], sys.argv[2]
os.chdir(WORK)
sys.path.insert(0, WORK)

# An application package: a trusted transport and the task module its rule admits.
os.makedirs("myapp", exist_ok=True)
open("myapp/__init__.py", "w").close()
with open("myapp/tasks.py", "w") as f:
    f.write("import os\n\ndef echo(x):\n    return x\n")
with open("myapp/transport.py", "w") as f:
    f.write("import pickle\n\ndef receive(data):\n    return pickle.loads(data)\n")

# The application registered a copyreg extension code (a public API) before anything ran.
copyreg.add_extension("posix", "system", payloads.EXT_CODE)


def canary(name):
    return os.path.join(WORK, "canary-" + "".join(c if c.isalnum() else "_" for c in name))


class _Canary:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def build_carrier(loader, path, name):
    file = os.path.join(WORK, name.replace("/", "_") + ".bin")
    if loader == "torch":
        import torch

        torch.save(_Canary(path), file)
    elif loader == "torch_polyglot":
        import torch

        torch.save({"w": torch.zeros(1)}, file)
        data = open(file, "rb").read()
        # The same zip, preceded by a pickle: zip readers still find the archive.
        open(file, "wb").write(payloads.assemble(payloads.sh_call(path)) + data)
    elif loader == "joblib":
        import joblib

        joblib.dump(_Canary(path), file)
    elif loader == "numpy":
        import numpy

        numpy.save(file, numpy.array([_Canary(path)], dtype=object), allow_pickle=True)
        file += ".npy"
    return file


def write_payload(name, data):
    file = os.path.join(WORK, "payload-" + "".join(c if c.isalnum() else "_" for c in name))
    with open(file, "wb") as f:
        f.write(data)
    return file


def library_missing(loader):
    """torch is installed on the main test interpreter only (scripts/test-pythons deselects its
    techniques elsewhere); a technique left out here fails its test unless it was deselected."""
    import importlib.util

    return loader.startswith("torch") and importlib.util.find_spec("torch") is None


benign = pickle.dumps(payloads.BENIGN, protocol=4)
cases = []
for name, _family, loader, build in payloads.TECHNIQUES:
    if library_missing(loader):
        continue
    path = canary(name)
    if build is None:
        cases.append((name, loader, build_carrier(loader, path, name)))
    else:
        cases.append((name, loader, write_payload(name, build(path))))

if MODE == "enforce":
    import hashlib

    import picklegate

    listed = [hashlib.sha256(b).hexdigest() for b in (benign, payloads.EXT_WARMUP)]
    manifest = textwrap.dedent(f"""\
        version = 1
        [[allow]]
        sha256 = "{listed[0]}"
        callsite = "__main__:load_*"
        note = "the benign pickle every appended or polyglot payload hides behind"
        [[allow]]
        sha256 = "{listed[1]}"
        callsite = "__main__:warm_up"
        [[trust]]
        callsite = "myapp.transport:*"
        globals = ["myapp.tasks.*", "collections.OrderedDict"]
        """)
    with open("pickles.toml", "w") as f:
        f.write(manifest)
    picklegate.install(policy="pickles.toml", mode="enforce")


def warm_up():
    return pickle.loads(payloads.EXT_WARMUP)


class AppUnpickler(pickle.Unpickler):
    """An application's unpickler whose persistent ids name a function to call (hostile by design)."""

    def persistent_load(self, pid):
        module, name, arg = pid.split(":", 2)
        return getattr(importlib.import_module(module), name)(arg)


def load_bytes(data):
    return pickle.loads(data)


def load_file(file):
    with open(file, "rb") as f:
        return pickle.load(f)


def load_twice(f):
    first = pickle.load(f)
    return first, pickle.load(f)


def load_persistent(file):
    with open(file, "rb") as f:
        return AppUnpickler(f).load()


def load_pipe(file):
    read_end, write_end = os.pipe()
    with open(file, "rb") as src:
        os.write(write_end, src.read())
    os.close(write_end)
    with os.fdopen(read_end, "rb", buffering=0) as f:
        return load_twice(f)


def load_with_library(loader, file):
    if loader in ("torch", "torch_polyglot"):
        import torch

        return torch.load(file, weights_only=False)
    if loader == "joblib":
        import joblib

        return joblib.load(file)
    import numpy

    return numpy.load(file, allow_pickle=True)


def run(loader, file):
    from myapp import transport

    if loader == "loads":
        return load_bytes(open(file, "rb").read())
    if loader == "load_file":
        return load_file(file)
    if loader == "two_loads_file":
        with open(file, "rb") as f:
            return load_twice(f)
    if loader == "two_loads_pipe":
        return load_pipe(file)
    if loader == "persistent":
        return load_persistent(file)
    if loader == "transport":
        return transport.receive(open(file, "rb").read())
    return load_with_library(loader, file)


warm_up()
results = {}
for name, loader, file in cases:
    try:
        run(loader, file)
        outcome = "loaded"
    except BaseException as error:  # noqa: BLE001 - a payload may raise anything, even SystemExit
        outcome = type(error).__name__
    results[name] = {"outcome": outcome}

time.sleep(1.0)  # payloads that spawn a process (Popen, popen, pipepager) finish asynchronously
for name, _, _ in cases:
    results[name]["canary"] = os.path.exists(canary(name))
print(json.dumps(results))
