"""Legitimate pickle code whose observable behaviour must not change under picklegate: prints one
JSON object, scenario -> what the code saw (values, positions, exception classes and messages)."""

import _pickle
import io
import json
import os
import pickle
import sys
import tempfile


class MinimalIO:
    """A file with only read and readline (no peek, readinto, seek): bound to an inner BytesIO."""

    def __init__(self, data=b""):
        self._bio = io.BytesIO(data)
        self.read = self._bio.read
        self.readline = self._bio.readline


class UnseekableIO(io.BytesIO):
    def peek(self, *args):
        raise NotImplementedError

    def seekable(self):
        return False

    def seek(self, *args):
        raise io.UnsupportedOperation

    def tell(self, *args):
        raise io.UnsupportedOperation


def outcome(fn):
    try:
        return ["ok", repr(fn())]
    except Exception as error:
        return [type(error).__name__, str(error)]


DATA = [(x, str(x)) for x in range(300)] + [b"abcde", len, {"nested": [1, (2, 3)]}]


def multiple_unpicklings(ioclass):
    """One unpickler, several loads from one stream (CPython's test_multiple_unpicklings_*)."""
    seen = []
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        pickled = pickle.dumps(DATA, protocol=proto)
        f = ioclass(pickled * 3)
        unpickler = pickle.Unpickler(f)
        for _ in range(3):
            seen.append(unpickler.load() == DATA)
            if isinstance(f, io.BytesIO) and f.seekable():
                seen.append(f.tell())
        seen.append(outcome(unpickler.load))
    return seen


def reused_after_rewrite():
    """The same unpickler over a BytesIO truncated and rewritten between loads."""
    f = io.BytesIO(pickle.dumps(["abcdefg", "abcdefg", 44], protocol=0))
    unpickler = pickle.Unpickler(f)
    first = unpickler.load()
    f.seek(0)
    f.truncate()
    f.write(pickle.dumps(["abcdefg", 44, 44], protocol=0))
    f.seek(0)
    return [first, unpickler.load()]


def memo_priming():
    data = ["abcdefg", "abcdefg", 44]
    f = io.BytesIO()
    pickler = pickle.Pickler(f)
    pickler.dump(data)
    first = f.getvalue()
    f = io.BytesIO()
    primed = pickle.Pickler(f)
    primed.memo = pickler.memo
    primed.dump(data)
    unpickler = pickle.Unpickler(io.BytesIO(first))
    one = unpickler.load()
    primed_unpickler = pickle.Unpickler(io.BytesIO(f.getvalue()))
    primed_unpickler.memo = unpickler.memo
    two = primed_unpickler.load()
    return [one == data, two is one, len(primed_unpickler.memo.copy())]


def stream_of_dumps():
    """One Pickler dumps several objects sharing references; one Unpickler reads them back."""
    shared = {"shared": list(range(5))}
    f = io.BytesIO()
    pickler = pickle.Pickler(f, protocol=2)
    pickler.dump(shared)
    pickler.dump([shared, shared])
    f.seek(0)
    unpickler = pickle.Unpickler(f)
    a = unpickler.load()
    b = unpickler.load()
    return [b[0] is a, b[1] is a, f.tell() == len(f.getvalue())]


def load_stored_on_a_class():
    class Store:
        load = pickle.load
        c_load = _pickle.load
        loads = pickle.loads

    store = Store()
    pickled = pickle.dumps([1, 2])
    return [store.load(io.BytesIO(pickled)), store.c_load(io.BytesIO(pickled)), store.loads(pickled),
            type(pickle.load).__name__, pickle.load is _pickle.load, pickle.Unpickler is _pickle.Unpickler]


def sizes():
    unpickler = pickle.Unpickler(io.BytesIO(pickle.dumps([[0] * 30] * 20)), encoding="UTF-16")
    before = object.__sizeof__(unpickler), sys.getsizeof(unpickler)
    unpickler.load()
    return [before, sys.getsizeof(unpickler)]


def persistent_ids():
    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return f"id-{obj}" if isinstance(obj, int) and obj % 2 == 0 else None

    class U(pickle.Unpickler):
        def persistent_load(self, pid):
            return ("loaded", pid)

    f = io.BytesIO()
    P(f).dump(list(range(5)))
    f.seek(0)
    instance = pickle.Unpickler(io.BytesIO(f.getvalue()))
    instance.persistent_load = lambda pid: ("instance", pid)
    return [U(f).load(), instance.load()]


def file_positions(tmp):
    path = os.path.join(tmp, "two.pkl")
    with open(path, "wb") as f:
        pickle.dump({"a": 1}, f)
        pickle.dump([2, 3], f)
        f.write(b"trailing")
    seen = []
    with open(path, "rb") as f:
        seen += [pickle.load(f), f.tell(), pickle.Unpickler(f).load(), f.tell(), f.read()]
    with open(path, "rb") as f:
        unpickler = pickle.Unpickler(f)
        seen += [unpickler.load(), f.tell(), unpickler.load(), f.tell(), outcome(unpickler.load), f.tell()]
    return seen


def errors():
    return [
        outcome(lambda: pickle.load(io.BytesIO(b"X''."))),
        outcome(lambda: pickle.Unpickler(io.BytesIO(b"X''.")).load()),
        outcome(lambda: pickle.load(io.BytesIO(b""))),
        outcome(lambda: pickle.Unpickler(io.BytesIO(b"")).load()),
        outcome(lambda: pickle.loads(b"\x80\x04K")),
        outcome(lambda: pickle.load(object())),
        outcome(lambda: pickle.load(io.BytesIO(pickle.dumps(1)), encoding=3)),
        outcome(lambda: pickle.Unpickler.__new__(pickle.Unpickler).load()),
    ]


def main():
    with tempfile.TemporaryDirectory() as tmp:
        scenarios = {
            "multiple_unpicklings_seekable": lambda: multiple_unpicklings(io.BytesIO),
            "multiple_unpicklings_unseekable": lambda: multiple_unpicklings(UnseekableIO),
            "multiple_unpicklings_minimal": lambda: multiple_unpicklings(MinimalIO),
            "reused_after_rewrite": reused_after_rewrite,
            "memo_priming": memo_priming,
            "stream_of_dumps": stream_of_dumps,
            "load_stored_on_a_class": load_stored_on_a_class,
            "sizes": sizes,
            "persistent_ids": persistent_ids,
            "file_positions": lambda: file_positions(tmp),
            "errors": errors,
        }
        print(json.dumps({name: outcome(fn) for name, fn in scenarios.items()}))


if __name__ == "__main__":
    main()
