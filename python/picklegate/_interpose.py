"""Routes every unpickling entry point of ``pickle`` and ``_pickle`` through one decision point,
``_core.guarded_load``, which hashes the exact bytes that the real unpickler then reads."""

import _pickle
import functools
import io
import pickle
import threading
from collections.abc import Callable
from typing import Any, Optional, Union

from . import _core, _files, _loaders

#: What a load reads: a file read and hashed into memory, or the bytes of one pickle.
_Data = Union[_core.HashedFile, bytes]
#: Leaves the file just past the given number of bytes the unpickler used.
_Finish = Callable[[int], object]


def _unwrapped(obj: Any) -> Any:
    return getattr(obj, "__picklegate_original__", obj)


_ORIGINAL_LOADS = _unwrapped(_pickle.loads)
_ORIGINAL_LOAD = _unwrapped(_pickle.load)
_CUnpickler = _unwrapped(_pickle.Unpickler)
_PyUnpickler: Any = pickle._Unpickler
_original_py_load = _unwrapped(_PyUnpickler.load)

_lock = threading.Lock()
_CHUNK = 1 << 20
_patched = False
_redirected_loads = False
_redirected_load = False


def _read_one_pickle(read: Callable[[int], bytes], readline: Callable[[], bytes], joblib: bool = False) -> bytes:
    """Reads exactly one pickle from a stream that cannot seek, asking the scanner how much (with
    ``joblib``, as joblib reads it: the raw bytes of each array after its wrapper)."""
    scanner = _core.StreamScanner(joblib)
    data = bytearray()
    while True:
        need = scanner.feed(data)
        if need is None:
            return bytes(data)
        # A pickle may claim any length: read what the stream really holds, a chunk at a time.
        chunk = readline() if need < 0 else read(min(need, _CHUNK))
        if not chunk:
            if not data:
                return b""  # end of stream: the unpickler raises EOFError, as callers expect
            raise scanner.truncated(data)
        data += chunk


def _take(file: Any) -> tuple[_Data, Optional[str], _Finish]:
    """Reads what the next load consumes. Returns ``(data, source, finish)``; ``finish(n)``
    leaves the file just past the ``n`` bytes the unpickler used. ``data`` is a
    ``_core.HashedFile`` for a plain file opened for reading (read and hashed in one pass into
    memory it gives back as the unpickler consumes it), else the bytes."""
    if not (hasattr(file, "read") and hasattr(file, "readline")):
        raise TypeError("file must have 'read' and 'readline' attributes")
    source = _files.source_name(file)
    if type(file) is _core.HashedFile:
        return file, source, lambda used: None  # read and hashed already by a loader library's guard
    if _files.seekable(file):
        _core.refuse_unread(file, source)
        start = file.tell()
        data: _Data
        if type(file) in (io.BufferedReader, io.FileIO):
            data = _core.HashedFile(file.fileno(), start)
        else:
            data = file.read()
        return data, source, lambda used: file.seek(start + used)
    return _read_one_pickle(file.read, file.readline), source, lambda used: None


def _stream(data: _Data) -> Union[_core.HashedFile, io.BytesIO]:
    """What the unpickler reads: the hashed file itself, or a stream over the bytes."""
    return data if isinstance(data, _core.HashedFile) else io.BytesIO(data)


def _finished(
    data: _Data, stream: Union[_core.HashedFile, io.BytesIO], finish: _Finish, file: Any, failed: bool
) -> None:
    """Moves the file past what the unpickler used, and lets go of the memory read for it. After a
    failed load, a file with ``peek`` stays where it was: the C unpickler only peeks at such a file
    and consumes what it used when the load completes. A ``HashedFile`` that is the caller's own
    file (a loader library's guard made it) stays open: the library may seek back and read again."""
    finish(0 if failed and hasattr(file, "peek") else stream.tell())
    if isinstance(data, _core.HashedFile) and data is not file:
        data.close()


def _options(fix_imports: bool, encoding: str, errors: str, buffers: Any) -> dict[str, Any]:
    return {"fix_imports": fix_imports, "encoding": encoding, "errors": errors, "buffers": buffers}


def loads(
    data: Any, /, *, fix_imports: bool = True, encoding: str = "ASCII", errors: str = "strict", buffers: Any = ()
) -> Any:
    """The fallback for a CPython whose ``_pickle.loads`` cannot be redirected."""
    run = functools.partial(_ORIGINAL_LOADS, data, **_options(fix_imports, encoding, errors, buffers))
    return _core.guarded_load(data, None, run)


def load(
    file: Any, /, *, fix_imports: bool = True, encoding: str = "ASCII", errors: str = "strict", buffers: Any = ()
) -> Any:
    data, source, finish = _take(file)
    stream = _stream(data)
    failed = True
    try:
        run = functools.partial(_ORIGINAL_LOAD, stream, **_options(fix_imports, encoding, errors, buffers))
        result = _core.guarded_load(data, source, run)
        failed = False
        return result
    finally:
        _finished(data, stream, finish, file, failed)


def _take_for_unpickler(
    read: Callable[[int], bytes], readline: Callable[[], bytes]
) -> tuple[_Data, Optional[str], Union[_core.HashedFile, io.BytesIO], Callable[[bool], None]]:
    """What a live ``_pickle.Unpickler`` (given its file's ``read`` and ``readline``) consumes
    next: ``(data, source, stream, done)``. The unpickler reads ``stream`` instead of its file for
    that load; ``done(failed)`` then leaves the file just past what it used."""
    file = getattr(read, "__self__", None)
    if file is not None and getattr(readline, "__self__", None) is file and _files.seekable(file):
        data, source, finish = _take(file)
    else:
        data, source, finish = _read_one_pickle(read, readline), _files.source_name(file), lambda used: None
    stream = _stream(data)
    return data, source, stream, lambda failed: _finished(data, stream, finish, file, failed)


def _spelled_strings(data: Any) -> set[str]:
    """The strings a pickle spells out (its text arguments), for names resolved after its load."""
    import pickletools  # only for the few loads that need it

    strings: set[str] = set()
    try:
        for _, arg, _ in pickletools.genops(data):
            if isinstance(arg, str):
                strings.add(arg)
    except Exception:
        pass  # what was read before the error still counts; the unpickler reports the error
    return strings


def _learn_unpickler_layout() -> None:
    """Shows ``_core`` where a ``_pickle.Unpickler`` keeps its file methods and input counters, by
    making two unpicklers over probe files and finding the probes' own objects in them."""

    class Probe:
        read: Callable[..., bytes]
        readinto: Callable[..., bytes]
        readline: Callable[..., bytes]
        peek: Callable[..., bytes]

    fresh = Probe()
    methods: list[Callable[..., bytes]] = [lambda *args: b"" for _ in range(4)]
    fresh.read, fresh.readinto, fresh.readline, fresh.peek = methods
    pickled = b"\x80\x02K\x07."  # protocol 2: the int 7
    served = [pickled + b"xyz"]  # the first read returns more than asked: it all lands in the buffer
    loaded = Probe()
    loaded.read = lambda n: served.pop() if served else b""
    loaded.readline = lambda: b""
    unpickler = _CUnpickler(loaded)
    try:
        unpickler.load()
    except Exception:
        pass  # then the counters checked below do not match, and _core says the layout is unknown
    _core.learn_unpickler_layout(_CUnpickler(fresh), methods, unpickler, len(pickled) + 3, len(pickled))


class _Replay:
    """Serves a pure-Python unpickler the hashed bytes while keeping the real file's position in
    step, so subclasses that read the file themselves (joblib reads arrays) stay aligned."""

    def __init__(self, data: bytes, file: Any, start: int) -> None:
        self._stream = io.BytesIO(data)
        self._file = file
        self._start = start

    def _call(self, method: Callable[..., bytes], *args: int) -> bytes:
        if self._file is not None:
            self._stream.seek(self._file.tell() - self._start)
        result = method(*args)
        if self._file is not None:
            self._file.seek(self._start + self._stream.tell())
        return result

    def read(self, n: int = -1) -> bytes:
        return self._call(self._stream.read, n)

    def readline(self) -> bytes:
        return self._call(self._stream.readline)


def _guarded_py_load(self: Any) -> Any:
    """``pickle._Unpickler.load``, patched on the class so subclasses made before install
    (joblib's, dill's) are decided too."""
    read = getattr(self, "_file_read", None)
    readline = getattr(self, "_file_readline", None)
    if read is None or readline is None:
        return _original_py_load(self)  # raises the usual "__init__() was not called" error
    file = getattr(read, "__self__", None)
    source = _files.source_name(file)
    if type(file) is _core.PinnedFile:
        # A file a loader library's guard read and hashed whole: judged as that file, read in place.
        return _core.guarded_container(file, source, functools.partial(_original_py_load, self), True)
    if type(file) is _core.HashedFile:
        # Read and hashed already by a loader library's guard (pandas' fallback unpickler after
        # its seek back): read in place, whole (this unpickler is not the one its array plan is for).
        return _core.guarded_load(file, source, functools.partial(_original_py_load, self), self)
    if file is not None and _files.seekable(file):
        _core.refuse_unread(file, source)
        start = file.tell()
        data = file.read()
        file.seek(start)  # the file's position is the truth the replay follows
        replay = _Replay(data, file, start)
        inline = False
    else:
        # joblib reads its arrays' raw bytes from its own file handle (a socket, a pipe): read the
        # stream as joblib does and serve those reads from the same bytes.
        inline = file is not None and getattr(self, "file_handle", None) is file and type(self).__module__.startswith("joblib.")
        data = _read_one_pickle(read, readline, joblib=inline)
        replay = _Replay(data, None, 0)

    def run() -> Any:
        self._file_read, self._file_readline = replay.read, replay.readline
        if inline:
            self.file_handle = replay._stream
        try:
            return _original_py_load(self)
        finally:
            self._file_read, self._file_readline = read, readline
            if inline:
                self.file_handle = file

    return _core.guarded_load(data, source, run, self)


class _Builtinlike:
    """A wrapper that, like the builtin it stands for, does not bind as a method when a class
    stores it as an attribute (``load = pickle.load`` in a class body)."""

    def __init__(self, function: Callable[..., Any], original: Callable[..., Any]) -> None:
        functools.update_wrapper(self, function)
        self.__picklegate_original__ = original

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__wrapped__(*args, **kwargs)  # type: ignore[attr-defined]  # set by update_wrapper


_guarded_py_load.__picklegate_original__ = _original_py_load  # type: ignore[attr-defined]


def _patch_modules() -> None:
    """The module attributes stay the original builtins wherever the C functions are redirected;
    only where they could not be are the Python wrappers put in their place."""
    for module in (pickle, _pickle):
        if not _redirected_loads:
            module.loads = _Builtinlike(loads, _ORIGINAL_LOADS)  # type: ignore[attr-defined]
        if not _redirected_load:
            module.load = _Builtinlike(load, _ORIGINAL_LOAD)  # type: ignore[attr-defined]
    _PyUnpickler.load = _guarded_py_load


def _redirect_c_functions() -> None:
    """Reaches references to ``_pickle.loads``/``load`` captured before install (``loads`` is
    judged in Rust with no Python frame in between), and ``_pickle.Unpickler.load`` of classes
    made at any time: each load of a live unpickler is judged on the bytes it then runs. If this
    CPython's layout is unknown, the Python wrappers guard the module attributes and the backstop
    guards the rest."""
    global _ORIGINAL_LOAD, _redirected_loads, _redirected_load
    try:
        _core.redirect_loads(_ORIGINAL_LOADS)
        _redirected_loads = True
        _ORIGINAL_LOAD = _core.redirect_load(_ORIGINAL_LOAD, load)
        _redirected_load = True
        try:
            _learn_unpickler_layout()
        except RuntimeError:
            pass  # redirect_unpickler_load then refuses, saying why (and enforce will not start)
        else:
            _core.set_unpickler_take(_take_for_unpickler, _spelled_strings)
        _core.redirect_unpickler_load(_CUnpickler)
    except (TypeError, RuntimeError) as error:
        import logging  # not at the top: importing logging costs start-up time in every process

        logging.getLogger("picklegate").warning(
            "picklegate: references to _pickle.load(s) captured before install and Unpickler "
            "classes made before install are covered by the audit-hook backstop only: "
            "%s", error)


def activate() -> None:
    """Patches the entry points and registers the backstop; safe to call any number of times."""
    global _patched
    with _lock:
        _core.install_backstop()
        if not _patched:
            _redirect_c_functions()
        _patch_modules()
        _loaders.activate()
        _patched = True
    _core.require_full_interposition()  # enforce refuses to run weaker than it says


def activate_implicitly() -> None:
    """``no_pickles()`` with nothing installed switches the interposer on with mode ``off``."""
    if _core.current_state() is None:
        _core.configure("off", None, "implicit")
    if not _patched:
        activate()
