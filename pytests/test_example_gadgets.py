"""The shipped policy examples admit no gadget built from their own globals (issue 11, findings 1
and 2): each payload here uses only names an example's patterns spell, runs its canary without
picklegate (the control), and is refused under enforce with that example."""

import pathlib
import pickle
import re
import textwrap

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "policy-examples"

#: Loads `data` from a function whose frame reads as `callsite`, as the transport's own code would.
LOAD_AT = """
import pickle, sys

def load_at(callsite, data):
    module, qualname = callsite.split(":")
    *classes, function = qualname.split(".")
    source, indent = "import pickle\\n", ""
    for name in classes:
        source += f"{indent}class {name}:\\n"
        indent += "    "
    source += f"{indent}def {function}(data):\\n{indent}    return pickle.loads(data)\\n"
    namespace = {"__name__": module}
    exec(compile(source, f"<{module}>", "exec"), namespace)
    target = namespace[qualname.split(".")[0]]
    for name in qualname.split(".")[1:]:
        target = getattr(target, name)
    return target(data)
"""

#: A task module as applications write them: it imports modules and functions it uses.
TASKS = """
import functools, os, subprocess
from importlib import import_module
from subprocess import check_call
environ = os.environ

def square(x):
    return x * x

class Point:
    pass

@functools.lru_cache(maxsize=None)
def cached_square(x):
    return x * x

def __getattr__(name):          # module machinery: defined here, but never admitted by a pattern
    raise AttributeError(name)
"""


def trust_rules(example):
    """`(callsite, [global patterns])` of each `[[trust]]` rule of an example file."""
    text = re.sub(r"#.*", "", example.read_text())
    rules = []
    for block in text.split("[[trust]]")[1:]:
        callsite = re.search(r'callsite\s*=\s*"([^"]+)"', block).group(1)
        globals_ = re.findall(r'"([^"]+)"', re.search(r"globals\s*=\s*\[(.*?)\]", block, re.S).group(1))
        rules.append((callsite, globals_))
    return rules


def concrete(callsite):
    """A callsite a `[[trust]]` callsite pattern matches."""
    return callsite[:-2] + ".queues:Queue.get" if callsite.endswith(".*") else callsite


@pytest.fixture
def app(tmp_path):
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "tasks.py").write_text(TASKS)
    return tmp_path


def run_gadget(run_python, example, callsite, payload, canary, guarded, app):
    env = {"PYTHONPATH": str(app)}
    if guarded:
        env.update(PICKLEGATE_POLICY=str(EXAMPLES / example), PICKLEGATE_MODE="enforce")
    code = LOAD_AT + textwrap.dedent(
        f"""
        import os, time, picklegate
        try:
            load_at({callsite!r}, {payload!r})
            print("LOADED")
        except picklegate.PickleDeniedError as error:
            print("DENIED", error)
        for _ in range({50 if not guarded else 10}):  # what a gadget started may finish later
            if os.path.exists({str(canary)!r}):
                break
            time.sleep(0.1)
        """
    )
    return run_python(code, env=env, check=True).stdout


def dask_browser_chain(canary):
    """Finding 1: only `dask._expr.os` and `dask._expr.import_required` (both spelled by the old
    `dask._expr.*`): BUILD os.environ = {"BROWSER": ...} on the module, then import antigravity."""
    browser = f"/bin/sh -c 'touch {canary}' %s"
    return (
        b"cdask._expr\nos\n"
        + b"(dp0\nVenviron\n(dp1\nVBROWSER\nV" + browser.encode() + b"\nssb0"
        + b"cdask._expr\nimport_required\n(Vantigravity\nV\ntR."
    )


class _Reduce:
    def __init__(self, *reduced):
        self.reduced = reduced

    def __reduce__(self):
        return self.reduced


def spawnv_passfds_chain(canary):
    """Finding 2: `multiprocessing.*` spelled multiprocessing.util.spawnv_passfds (runs a program)."""
    from multiprocessing.util import spawnv_passfds

    touch = b"/usr/bin/touch"
    return pickle.dumps(_Reduce(spawnv_passfds, (touch, [touch, str(canary).encode()], ())), protocol=3)


GADGETS = {
    "dask-browser": ("dask.toml", "distributed.protocol.pickle:loads", dask_browser_chain),
    "dask-queue-spawnv": ("dask.toml", "multiprocessing.queues:Queue.get", spawnv_passfds_chain),
    "dask-spawn-spawnv": ("dask.toml", "multiprocessing.spawn:_main", spawnv_passfds_chain),
    "transport-spawnv": ("transport-trust.toml", "multiprocessing.queues:Queue.get", spawnv_passfds_chain),
}


@pytest.mark.parametrize("name", sorted(GADGETS))
def test_gadget_from_an_example_runs_unguarded_and_is_refused_under_it(name, run_python, app, canary):
    example, callsite, build = GADGETS[name]
    path, _ = canary
    payload = build(path)
    control = run_gadget(run_python, example, callsite, payload, path, guarded=False, app=app)
    assert path.exists(), f"the control did not run the gadget: {control}"
    path.unlink()
    out = run_gadget(run_python, example, callsite, payload, path, guarded=True, app=app)
    assert out.startswith("DENIED"), out
    assert not path.exists(), f"{name} ran under enforce with {example}"


def test_a_multiprocessing_queue_refuses_raw_bytes_naming_spawnv_passfds(run_python, app, canary):
    """Finding 2 end to end: bytes written to a real multiprocessing.Queue, read by q.get()."""
    path, _ = canary
    payload = spawnv_passfds_chain(path)
    code = """
        import multiprocessing, os, sys, time, picklegate
        q = multiprocessing.Queue()
        q._sem.acquire()                          # what put() does before its feeder thread writes
        q._writer.send_bytes(open(sys.argv[1], "rb").read())
        try:
            q.get(timeout=10)
            print("LOADED")
        except picklegate.PickleDeniedError as error:
            print("DENIED", error.callsite)
        time.sleep(1)
    """
    (app / "payload.pkl").write_bytes(payload)
    args = [str(app / "payload.pkl")]
    run_python(code, args=args, check=True)
    assert path.exists(), "the control did not run the gadget"
    path.unlink()
    env = {"PICKLEGATE_POLICY": str(EXAMPLES / "dask.toml"), "PICKLEGATE_MODE": "enforce"}
    out = run_python(code, env=env, args=args, check=True).stdout
    assert out.strip() == "DENIED multiprocessing.queues:Queue.get", out
    assert not path.exists()


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.toml") if trust_rules(p)))
def test_patterns_admit_no_module_and_no_imported_name(example, run_python, app):
    """Every name each `*` pattern of the example spells, among what the module holds: the classes and
    functions it defines load; its modules, imported names and instances are refused."""
    rules = trust_rules(EXAMPLES / example)
    code = LOAD_AT + textwrap.dedent(
        f"""
        import fnmatch, importlib, inspect, picklegate
        refused = loaded = 0
        loaded_names = set()
        for callsite, patterns in {[(concrete(c), g) for c, g in rules]!r}:
            for pattern in (p for p in patterns if "*" in p):
                module_name, name_pattern = pattern.rsplit(".", 1)
                assert "*" not in module_name, pattern
                try:
                    module = importlib.import_module(module_name)
                except ImportError:
                    continue                      # __mp_main__ exists only in spawn children
                for name, value in sorted(vars(module).items()):
                    if not fnmatch.fnmatchcase(name, name_pattern) or "." in name:
                        continue
                    dunder = name.startswith("__") and name.endswith("__")
                    defined = (inspect.isclass(value) or callable(value)) and not inspect.ismodule(value) \\
                        and getattr(value, "__qualname__", None) == name \\
                        and importlib.import_module(value.__module__) is module and not dunder
                    data = f"c{{module_name}}\\n{{name}}\\n.".encode()
                    try:
                        got = load_at(callsite, data)
                        assert defined and got is value, (callsite, module_name, name)
                        loaded += 1
                        loaded_names.add(f"{{module_name}}.{{name}}")
                    except picklegate.PickleDeniedError as error:
                        assert not defined, (callsite, module_name, name, str(error))
                        expected = "is not allowed by the [[trust]] rule" if dunder else "not a class or function defined in that module"
                        assert expected in str(error), str(error)
                        refused += 1
        print(refused, loaded, "myapp.tasks.cached_square" in loaded_names and "myapp.tasks.__getattr__" not in loaded_names)
        """
    )
    env = {"PICKLEGATE_POLICY": str(EXAMPLES / example), "PICKLEGATE_MODE": "enforce", "PYTHONPATH": str(app)}
    proc = run_python(code, env=env, check=True)
    refused, loaded, wrapped = proc.stdout.split()
    assert int(refused) > 0 and int(loaded) > 0, proc.stdout
    # a task function wrapped by functools.lru_cache is still the module's own
    assert wrapped == "True", proc.stdout


def test_a_pattern_never_admits_a_python2_spelling_that_protocol_0_renames(run_python, tmp_path, canary):
    """`__builtin__.*` reads as a module that does not exist, but protocols 0-2 resolve it as
    builtins (fix_imports): `__builtin__.eval` must not pass as "does not resolve"."""
    path, _ = canary
    (tmp_path / "trust.toml").write_text(
        'version = 1\n[[trust]]\ncallsite = "myapp.transport:*"\nglobals = ["__builtin__.*", "copy_reg.*"]\n'
    )
    payload = b"c__builtin__\neval\n(V__import__('os').system('touch " + str(path).encode() + b"')\ntR."
    code = LOAD_AT + textwrap.dedent(
        f"""
        import picklegate
        try:
            load_at("myapp.transport:recv", {payload!r})
            print("LOADED")
        except picklegate.PickleDeniedError as error:
            print("DENIED", "not a class or function defined in that module" in str(error))
        """
    )
    assert run_python(code, check=True).stdout.strip() == "LOADED" and path.exists(), "control"
    path.unlink()
    env = {"PICKLEGATE_POLICY": str(tmp_path / "trust.toml"), "PICKLEGATE_MODE": "enforce"}
    out = run_python(code, env=env, check=True).stdout.strip()
    assert out == "DENIED True", out
    assert not path.exists()
