"""Child process for test_libraries.py: saves real files with one library's own saver, then
loads them under picklegate enforce and prints what happened as JSON. Usage: LIB WORKDIR [control]."""

import hashlib
import json
import os
import subprocess
import sys

LIB, WORK = sys.argv[1], sys.argv[2]
CANARY = os.path.join(WORK, "CANARY")


class Canary:
    def __reduce__(self):
        return (os.system, (f"touch {CANARY}",))


def touch_canary():
    os.system(f"touch {CANARY}")


class CodeCanary:
    """Carries its payload as serialized code (dill/cloudpickle pickle __main__ functions by value)."""

    def __reduce__(self):
        return (touch_canary, ())


def path(name):
    return os.path.join(WORK, name)


if LIB == "torch":
    import torch

    def save(obj, p):
        torch.save(obj, p)

    good_object, evil_object = {"w": torch.arange(4.0)}, Canary()
    LOAD = "torch.load(p, weights_only=False)"
elif LIB in ("joblib", "joblib-zlib", "joblib-gzip", "joblib-bz2", "joblib-lzma", "joblib-xz"):
    import joblib
    import numpy

    compress = 0 if LIB == "joblib" else (LIB.split("-")[1], 3)

    def save(obj, p):
        joblib.dump(obj, p, compress=compress)

    good_object, evil_object = {"a": numpy.arange(5)}, Canary()
    LOAD = "joblib.load(p)"
elif LIB == "numpy":
    import numpy

    def save(obj, p):
        with open(p, "wb") as f:
            numpy.save(f, numpy.array([obj], dtype=object), allow_pickle=True)

    good_object, evil_object = {"x": 1}, Canary()
    LOAD = "numpy.load(p, allow_pickle=True)"
elif LIB == "numpy-npz":
    import numpy

    def save(obj, p):
        with open(p, "wb") as f:
            numpy.savez(f, objects=numpy.array([obj], dtype=object), numbers=numpy.arange(3))

    good_object, evil_object = {"x": 1}, Canary()
    LOAD = "numpy.load(p, allow_pickle=True)['objects']"
elif LIB == "pandas":
    import pandas

    def save(obj, p):
        pandas.to_pickle(obj, p)

    good_object, evil_object = pandas.DataFrame({"a": [1, 2]}), Canary()
    LOAD = "pandas.read_pickle(p)"
elif LIB == "dill":
    import dill

    def save(obj, p):
        with open(p, "wb") as f:
            dill.dump(obj, f)

    good_object, evil_object = (lambda x: x + 1), CodeCanary()
    LOAD = "dill.load(open(p, 'rb'))"
elif LIB == "cloudpickle":
    import cloudpickle

    def save(obj, p):
        with open(p, "wb") as f:
            f.write(cloudpickle.dumps(obj))

    good_object, evil_object = (lambda x: x + 1), CodeCanary()
    LOAD = "cloudpickle.loads(open(p, 'rb').read())"
else:
    sys.exit(f"unknown library {LIB}")

good, evil, flipped = path("good.bin"), path("evil.bin"), path("flipped.bin")
save(good_object, good)
save(evil_object, evil)
data = bytearray(open(good, "rb").read())
data[-1] ^= 1
open(flipped, "wb").write(bytes(data))

if sys.argv[3:] == ["control"]:
    # Without picklegate the malicious file really runs its payload: the canary proves it.
    exec(f"def load_user_model(p):\n    return {LOAD}\n")
    try:
        load_user_model(evil)
    except Exception:
        pass
    print(json.dumps({"canary": os.path.exists(CANARY)}))
    sys.exit(0)

cli = subprocess.run([sys.executable, "-m", "picklegate", "hash", good], capture_output=True, text=True, check=True)
listed = cli.stdout.split()[0]
assert listed == hashlib.sha256(open(good, "rb").read()).hexdigest()
with open(path("pickles.toml"), "w") as f:
    f.write(f'version = 1\n[[allow]]\nsha256 = "{listed}"\ncallsite = "__main__:load_user_model"\n')

import picklegate  # noqa: E402

picklegate.install(policy=path("pickles.toml"))
opened = []
sys.addaudithook(lambda event, args: opened.append(args[0]) if event == "open" and args and args[0] == good else None)


# Both callers are written out so that the library call sits directly in them.
exec(f"def load_user_model(p):\n    return {LOAD}\n\ndef somewhere_else(p):\n    return {LOAD}\n")


def outcome(fn, p):
    try:
        fn(p)
        return {"result": "loaded"}
    except picklegate.PickleDeniedError as error:
        return {"result": "denied", "callsite": error.callsite, "sha256": error.sha256}


value = load_user_model(good)
report = {
    "allowed": repr(value(1) if callable(value) else value),
    "opens_of_allowed_file": len(opened),
    "flipped": outcome(load_user_model, flipped),
    "evil": outcome(load_user_model, evil),
    "elsewhere": outcome(somewhere_else, good),
    "canary": os.path.exists(CANARY),
    "listed": listed,
}
print(json.dumps(report))
