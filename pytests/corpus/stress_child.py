"""Hammers the decision point: ``stress_child.py WORKDIR THREADS LOADS [PROCESSES]`` runs THREADS
threads of LOADS loads each (in PROCESSES forked processes), mixing allowed, denied and token loads."""

import hashlib
import json
import multiprocessing
import os
import pickle
import sys
import threading
import time

WORK, THREADS, LOADS = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
PROCESSES = int(sys.argv[4]) if len(sys.argv) > 4 else 0
os.chdir(WORK)
ALLOWED = pickle.dumps({"model": list(range(8))}, protocol=4)
UNLISTED = pickle.dumps({"model": list(range(9))}, protocol=4)
CANARY = os.path.join(WORK, "CANARY")
EVIL = b"cposix\nsystem\n(S'touch " + CANARY.encode() + b"'\ntR."
with open("pickles.toml", "w") as f:
    f.write(f'version = 1\n[[allow]]\nsha256 = "{hashlib.sha256(ALLOWED).hexdigest()}"\ncallsite = "__main__:worker.*"\n'
            '[[trust]]\ncallsite = "multiprocessing.*"\nglobals = ["multiprocessing.pool.*", "__main__.run_threads"]\n')

import picklegate  # noqa: E402

picklegate.install(policy="pickles.toml", mode="enforce")
EXPECTED = {"allowed": "ok", "unlisted": "PickleDeniedError", "evil": "PickleDeniedError",
            "in-block": "NoPickleError", "lifted": "ok", "only-other": "NoPickleError"}


def outcome(fn):
    try:
        fn()
        return "ok"
    except Exception as error:  # noqa: BLE001 - the kind of error is what is checked
        return type(error).__name__


def worker(seed):
    wrong, counts = [], dict.fromkeys(EXPECTED, 0)
    for i in range(LOADS):
        kind = list(EXPECTED)[(seed + i) % len(EXPECTED)]
        if kind == "allowed":
            got = outcome(lambda: pickle.loads(ALLOWED))
        elif kind == "unlisted":
            got = outcome(lambda: pickle.loads(UNLISTED))
        elif kind == "evil":
            got = outcome(lambda: pickle.loads(EVIL))
        else:
            with picklegate.no_pickles() as token:
                if kind == "in-block":
                    got = outcome(lambda: pickle.loads(ALLOWED))
                elif kind == "lifted":
                    with picklegate.allow_pickles(token):
                        got = outcome(lambda: pickle.loads(ALLOWED))
                else:
                    with picklegate.allow_pickles(token, only_objects=["sha256:" + "0" * 64]):
                        got = outcome(lambda: pickle.loads(ALLOWED))
        counts[kind] += 1
        if got != EXPECTED[kind]:
            wrong.append((kind, got))
    return wrong, counts


def run_threads(_=None):
    results = [None] * THREADS

    def target(n):
        results[n] = worker(n)

    threads = [threading.Thread(target=target, args=(n,)) for n in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wrong = [w for r in results for w in r[0]]
    loads = sum(sum(r[1].values()) for r in results)
    denials = sum(n for r in results for kind, n in r[1].items() if EXPECTED[kind] != "ok")
    return wrong[:10], len(wrong), loads, denials


start = time.monotonic()
if PROCESSES:
    with multiprocessing.get_context("fork").Pool(PROCESSES) as pool:
        parts = pool.map(run_threads, range(PROCESSES))
    sample = [w for p in parts for w in p[0]][:10]
    wrong, loads, denials = (sum(p[i] for p in parts) for i in (1, 2, 3))
else:
    sample, wrong, loads, denials = run_threads()
print(json.dumps({"loads": loads, "wrong": wrong, "denials": denials, "sample": sample, "canary": os.path.exists(CANARY),
                  "seconds": round(time.monotonic() - start, 2)}))
