"""multiprocessing Pools (fork, spawn, forkserver) and ProcessPoolExecutors work under enforce with the
transport-trust example, and a canary task argument is refused in the worker (issue 3, acceptance 4)."""

import pathlib

import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "policy-examples" / "transport-trust.toml"

SCRIPT = """
import concurrent.futures, multiprocessing, os, sys
import picklegate
from concurrent.futures.process import BrokenProcessPool

class Canary:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))

def square(x):
    return x * x

def boom(x):
    raise ValueError(x)

if __name__ == "__main__":
    ctx = multiprocessing.get_context(sys.argv[1])
    print("state", picklegate.state()[0], picklegate.state()[2])
    with ctx.Pool(1) as pool:
        print("pool", sum(pool.map(square, range(10))), pool.apply(square, (7,)))
        try:
            pool.apply(boom, (5,))
        except ValueError as error:
            print("pool error", error)
        refused = pool.apply_async(square, (Canary(),))
        # The worker that took the canary task died refusing it; its replacement runs the next.
        print("after canary", pool.apply(square, (3,)), refused.ready())
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as executor:
        print("executor", sum(executor.map(square, range(10))))
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as executor:
        error = executor.submit(square, Canary()).exception()
        print("executor canary", type(error).__name__)
"""


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_pools_run_under_enforce_and_refuse_a_canary_task(method, run_python, canary):
    path, _ = canary
    proc = run_python(
        SCRIPT,
        env={"PICKLEGATE_POLICY": str(EXAMPLE), "PICKLEGATE_MODE": "enforce"},
        args=[method, str(path)],
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "state enforce environment",
        "pool 285 49",
        "pool error 5",
        "after canary 9 False",
        "executor 285",
        "executor canary BrokenProcessPool",
    ], proc.stderr
    assert proc.stderr.count("PickleDeniedError") >= 2, proc.stderr
    assert "global posix.system is not allowed by the [[trust]] rule" in proc.stderr
    assert not path.exists(), "the canary task argument ran in a worker"


def test_without_the_trust_rule_the_pool_transport_itself_is_refused(run_python, tmp_path, canary):
    """The control: under enforce with no trust rule, the workers refuse multiprocessing's pickles."""
    path, _ = canary
    policy = tmp_path / "empty.toml"
    policy.write_text("version = 1\n")
    proc = run_python(
        """
        import concurrent.futures, sys

        def square(x):
            return x * x

        if __name__ == "__main__":
            with concurrent.futures.ProcessPoolExecutor(1) as executor:
                print(type(executor.submit(square, 3).exception()).__name__)
        """,
        env={"PICKLEGATE_POLICY": str(policy)},
    )
    assert proc.stdout.strip() == "BrokenProcessPool", proc.stderr
    assert "PickleDeniedError" in proc.stderr


def test_pools_are_guarded_through_the_preload_alone(tmp_path, canary):
    """A CPython without picklegate installed: spawn children inherit LD_PRELOAD and bootstrap too."""
    from test_preload import STATIC_PYTHON, preload_path, run

    path, _ = canary
    (tmp_path / "app.py").write_text(SCRIPT)
    env = {"PICKLEGATE_POLICY": str(EXAMPLE), "LD_PRELOAD": preload_path()}
    proc = run([STATIC_PYTHON, "-I", "-S", "app.py", "spawn", str(path)], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "after canary 9 False" in proc.stdout and "executor canary BrokenProcessPool" in proc.stdout
    assert "global posix.system is not allowed by the [[trust]] rule" in proc.stderr
    assert not path.exists(), "the canary task argument ran in a worker"


REFUSAL_IN_A_TASK = """
import concurrent.futures, multiprocessing, pickle, sys
import picklegate

def load_unlisted(path):
    with open(path, "rb") as f:
        return pickle.load(f)

def square(x):
    return x * x

if __name__ == "__main__":
    ctx = multiprocessing.get_context(sys.argv[1])
    with open("unlisted.pkl", "wb") as f:
        pickle.dump([1, 2, 3], f)
    with ctx.Pool(1) as pool:
        try:
            pool.apply_async(load_unlisted, ("unlisted.pkl",)).get(timeout=30)
            print("pool loaded")
        except multiprocessing.TimeoutError:
            print("pool hung")
        except picklegate.PickleDeniedError as error:
            print("pool refused", error.callsite, len(error.sha256), error.size)
        print("pool next", pool.apply_async(square, (3,)).get(timeout=30))
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as executor:
        error = executor.submit(load_unlisted, "unlisted.pkl").exception(timeout=30)
        print("executor", type(error).__name__, getattr(error, "callsite", None))
        print("executor next", executor.submit(square, 4).result(timeout=30))
"""


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_refusal_inside_a_task_reaches_the_parent_and_the_pool_survives(method, run_python):
    """Issue 11, finding 8: the worker's PickleDeniedError comes back as an error the parent can
    unpickle under the shipped trust example: Pool.apply raises (it hung), an executor stays usable."""
    proc = run_python(
        REFUSAL_IN_A_TASK,
        env={"PICKLEGATE_POLICY": str(EXAMPLE), "PICKLEGATE_MODE": "enforce"},
        args=[method],
        timeout=150,
    )
    assert proc.returncode == 0, proc.stderr
    main = "__main__" if method == "fork" else "__mp_main__"
    assert proc.stdout.splitlines() == [
        f"pool refused {main}:load_unlisted 64 22",
        "pool next 9",
        f"executor PickleDeniedError {main}:load_unlisted",
        "executor next 16",
    ], proc.stderr
