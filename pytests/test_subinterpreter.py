"""A load refused inside a subinterpreter raises there and the process carries on (issue 11,
finding 8: on CPython 3.11 the refusal's log line waited for the GIL it already held, forever)."""

import sys

import pytest

INNER = (
    "import pickle\n"
    "try:\n"
    "    pickle.loads({payload!r})\n"
    "    print('sub ran', flush=True)\n"
    "except Exception as error:\n"  # an isolated interpreter has its own pickle module
    "    print('sub', type(error).__name__, flush=True)\n"
)

#: How each CPython runs code in a new subinterpreter that shares the main GIL (own-GIL ones: SECURITY.md).
if sys.version_info < (3, 12):
    RUNNERS = {"shared-gil": "import _xxsubinterpreters as i\ni.run_string(i.create(), INNER)"}
elif sys.version_info[:2] == (3, 12):
    RUNNERS = {"shared-gil": "import _xxsubinterpreters as i\ni.run_string(i.create(isolated=False), INNER)"}
else:
    RUNNERS = {"legacy": "import _interpreters as i\ni.exec(i.create('legacy'), INNER)"}


@pytest.mark.parametrize("kind", sorted(RUNNERS))
def test_a_refusal_inside_a_subinterpreter_raises_there(kind, run_python, canary):
    path, payload = canary
    proc = run_python(
        f"""
        import picklegate
        picklegate.install(mode="enforce")
        INNER = {INNER.format(payload=payload)!r}
        exec({RUNNERS[kind]!r})
        print("main carries on")
        """,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["sub PickleDeniedError", "main carries on"], proc.stderr
    assert '"decision":"deny"' in proc.stderr
    assert not path.exists()
