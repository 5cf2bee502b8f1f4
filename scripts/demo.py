"""picklegate in 30 seconds: a reviewed pickle loads at its callsite, a malicious one is
refused before it runs, and no_pickles()/allow_pickles() narrow loads inside code."""

import hashlib
import os
import pathlib
import pickle
import sys
import tempfile

import picklegate

work = pathlib.Path(tempfile.mkdtemp(prefix="picklegate-demo-"))
canary = work / "CANARY"


class Malicious:
    def __reduce__(self):
        return (os.system, (f"touch {canary}",))


model = pickle.dumps({"weights": [0.1, 0.2, 0.3]})
(work / "model.pkl").write_bytes(model)
(work / "evil.pkl").write_bytes(pickle.dumps(Malicious()))
model_sha = hashlib.sha256(model).hexdigest()
(work / "pickles.toml").write_text(
    f'version = 1\n\n[[allow]]\nsha256 = "{model_sha}"\ncallsite = "__main__:load_model"\nnote = "demo model"\n'
)
os.environ.setdefault("PICKLEGATE_LOG", str(work / "decisions.jsonl"))

print(picklegate.install(policy=work / "pickles.toml"))


def load_model(path):
    with open(path, "rb") as f:
        return pickle.load(f)


print("1. the reviewed model, at its callsite:", load_model(work / "model.pkl"))

try:
    load_model(work / "evil.pkl")
except picklegate.PickleDeniedError as error:
    print("2. a malicious pickle is refused before it runs:\n   " + str(error).splitlines()[0])
if canary.exists():
    sys.exit("the malicious pickle ran: picklegate failed")

with picklegate.no_pickles() as token:
    try:
        load_model(work / "model.pkl")
    except picklegate.NoPickleError:
        print("3. inside no_pickles(), even the reviewed model is refused")
    with picklegate.allow_pickles(token, only_objects=[f"sha256:{model_sha}"]):
        print("4. allow_pickles(token, only_objects=[its sha256]) lets it through:", load_model(work / "model.pkl"))
    try:
        with picklegate.allow_pickles(object()):
            pass
    except picklegate.BadTokenError:
        print("5. a forged token is refused")

print(f"decisions were logged as JSON lines to {os.environ['PICKLEGATE_LOG']}")
