"""The token API of SPEC.md: no_pickles() narrows, allow_pickles(token) lifts exactly its own
block, only_objects narrows by hash, and a token opens nothing outside its own context."""

import hashlib
import pickle

DATA = pickle.dumps({"a": 1})
SHA = hashlib.sha256(DATA).hexdigest()

PRELUDE = f"""
import asyncio, pickle, threading, picklegate
from picklegate import NoPickleError, BadTokenError, allow_pickles, no_pickles
DATA = {DATA!r}
SHA = "{SHA}"
def attempt(label, fn):
    try:
        fn()
        print(label, "ok")
    except Exception as error:
        print(label, type(error).__name__)
"""


def outcomes(run_python, body):
    proc = run_python(PRELUDE + body, check=True)
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines())


def test_the_six_cases_of_the_spec(run_python):
    got = outcomes(
        run_python,
        """
attempt("1-outside", lambda: pickle.loads(DATA))
with no_pickles() as token:
    attempt("2-inside", lambda: pickle.loads(DATA))
    with allow_pickles(token):
        attempt("3-allowed", lambda: pickle.loads(DATA))
    with allow_pickles(token, only_objects=["sha256:" + SHA]):
        attempt("4-only-listed", lambda: pickle.loads(DATA))
    with allow_pickles(token, only_objects=["sha256:" + "0" * 64]):
        attempt("5-only-unlisted", lambda: pickle.loads(DATA))
    def forged():
        with allow_pickles(object()):
            pass
    attempt("6-forged", forged)
def stale():
    with allow_pickles(token):
        pickle.loads(DATA)
attempt("7-stale", stale)
""",
    )
    assert got == {
        "1-outside": "ok",
        "2-inside": "NoPickleError",
        "3-allowed": "ok",
        "4-only-listed": "ok",
        "5-only-unlisted": "NoPickleError",
        "6-forged": "BadTokenError",
        "7-stale": "BadTokenError",
    }


def test_token_from_another_thread_and_task_is_refused(run_python):
    got = outcomes(
        run_python,
        """
with no_pickles() as token:
    def use():
        with allow_pickles(token):
            pickle.loads(DATA)
    result = {}
    thread = threading.Thread(target=lambda: attempt("thread", use))
    thread.start(); thread.join()

async def main():
    with no_pickles() as token:
        async def other_task():
            with allow_pickles(token):
                pickle.loads(DATA)
        async def inherited_block():
            pickle.loads(DATA)
        await asyncio.create_task(asyncio.to_thread(lambda: None))
        t1 = asyncio.create_task(other_task())
        t2 = asyncio.create_task(inherited_block())
        for label, task in (("task", t1), ("task-inherits-block", t2)):
            try:
                await task
                print(label, "ok")
            except Exception as error:
                print(label, type(error).__name__)
        with allow_pickles(token):
            attempt("same-task", lambda: pickle.loads(DATA))
asyncio.run(main())
""",
    )
    assert got == {
        "thread": "BadTokenError",
        "task": "BadTokenError",
        "task-inherits-block": "NoPickleError",
        "same-task": "ok",
    }


def test_scope_is_per_thread(run_python):
    got = outcomes(
        run_python,
        """
with no_pickles():
    thread = threading.Thread(target=lambda: attempt("other-thread", lambda: pickle.loads(DATA)))
    thread.start(); thread.join()
    attempt("this-thread", lambda: pickle.loads(DATA))
""",
    )
    assert got == {"other-thread": "ok", "this-thread": "NoPickleError"}


def test_a_library_cannot_reopen_what_the_application_closed(run_python):
    got = outcomes(
        run_python,
        """
with no_pickles() as app_token:
    with allow_pickles(app_token, only_objects=["sha256:" + "0" * 64]):
        # a library opens its own block and lifts it: never more than the app allowed
        with no_pickles() as lib_token:
            with allow_pickles(lib_token):
                attempt("lib-reopen", lambda: pickle.loads(DATA))
    with no_pickles() as inner:
        with allow_pickles(app_token):
            attempt("outer-token-inside-inner-block", lambda: pickle.loads(DATA))
""",
    )
    assert got == {"lib-reopen": "NoPickleError", "outer-token-inside-inner-block": "NoPickleError"}


def test_the_operator_layer_stays_outermost(run_python, tmp_path):
    """allow_pickles cannot admit what the operator's manifest refuses."""
    got = outcomes(
        run_python,
        """
picklegate.install(mode="enforce")
with no_pickles() as token:
    with allow_pickles(token):
        attempt("lifted-but-operator-refuses", lambda: pickle.loads(DATA))
""",
    )
    assert got == {"lifted-but-operator-refuses": "PickleDeniedError"}


def test_no_pickles_covers_unpicklers_that_bypass_the_interposer(run_python):
    """A C Unpickler subclass made before picklegate was imported is caught by the backstop."""
    got = outcomes(
        run_python,
        """
import collections, io, _pickle
class Early(_pickle.Unpickler):
    pass
blob = pickle.dumps(collections.OrderedDict(a=1))
with no_pickles():
    attempt("early-subclass", lambda: Early(io.BytesIO(blob)).load())
""",
    )
    assert got == {"early-subclass": "NoPickleError"}


def test_tokens_cannot_be_made_or_copied(run_python):
    got = outcomes(
        run_python,
        """
import copy
attempt("construct", lambda: picklegate.Token())
with no_pickles() as token:
    attempt("copy", lambda: copy.copy(token))
    attempt("pickle", lambda: pickle.dumps(token))
    attempt("bad-hash", lambda: allow_pickles(token, only_objects=["sha256:xyz"]).__enter__())
""",
    )
    assert got["construct"] == "TypeError"
    assert got["copy"] == "TypeError"
    assert got["pickle"] == "TypeError"
    assert got["bad-hash"] == "ValueError"
