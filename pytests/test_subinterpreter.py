"""A load refused inside a subinterpreter raises there and the process carries on (issue 11,
finding 8: on CPython 3.11 the refusal's log line waited for the GIL it already held, forever)."""

import sys

import pytest


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="3.12+ subinterpreters have their own GIL: not covered")
def test_a_refusal_inside_a_subinterpreter_raises_there(run_python, canary):
    path, payload = canary
    inner = (
        "import pickle\n"
        "try:\n"
        f"    pickle.loads({payload!r})\n"
        "    print('sub ran')\n"
        "except pickle.UnpicklingError as error:\n"
        "    print('sub', type(error).__name__)\n"
    )
    proc = run_python(
        f"""
        import _xxsubinterpreters as interpreters, picklegate
        picklegate.install(mode="enforce")
        interpreters.run_string(interpreters.create(), {inner!r})
        print("main carries on")
        """,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["sub PickleDeniedError", "main carries on"], proc.stderr
    assert '"decision":"deny"' in proc.stderr
    assert not path.exists()
