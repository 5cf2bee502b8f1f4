"""Guards the loader libraries where users call them (torch.load, joblib.load, numpy.load,
pandas.read_pickle, dill.load/loads): each file is judged on its whole content's sha256."""

import builtins
import contextlib
import functools
import importlib.abc
import io
import os
import pickle
import stat
import sys
import threading
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any, Optional, Union

from . import _core, _errors, _files

#: A library function picklegate wraps, and the wrapper (both take what the library takes).
_Loader = Callable[..., Any]
#: A file judged whole (read and hashed once), as a library call gets it back.
_Checked = Union[_core.PinnedFile, _core.HashedFile]

_lock = threading.Lock()
_patched_modules: set[str] = set()


def _local_path(f: object) -> Optional[str]:
    if isinstance(f, (str, bytes, os.PathLike)):
        path = os.fsdecode(f)
        if "://" not in path:
            return os.path.abspath(path)
    return None


# The files a guarded library call on this thread may open, by absolute path: the library's own
# ``open(path, "rb")`` gets a file object over the bytes that were checked, never the path again.
_serving = threading.local()


@contextlib.contextmanager
def _serve(path: str, checked: object) -> Iterator[None]:
    table: Optional[dict[str, object]] = getattr(_serving, "files", None)
    if table is None:
        table = _serving.files = {}
    previous = table.get(path)
    table[path] = checked
    try:
        yield
    finally:
        if previous is None:
            del table[path]
        else:
            table[path] = previous


def _checked_open(real_open: _Loader) -> _Loader:
    """``open`` for a library module: a path a guarded call on this thread checked, opened for
    reading bytes, is served from the checked file; anything else is the real ``open``."""

    def open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        table = getattr(_serving, "files", None)
        if table and mode in ("rb", "br") and not args and not kwargs and isinstance(file, (str, os.PathLike)):
            checked = table.get(os.path.abspath(os.fspath(file)))
            if checked is not None:
                view = checked() if callable(checked) else checked.reopen()
                view.name = os.fspath(file)
                return view
        return real_open(file, mode, *args, **kwargs)

    open.__picklegate_original__ = real_open  # type: ignore[attr-defined]
    return open


def _shadow_open(module: Optional[ModuleType]) -> None:
    if module is not None and not hasattr(module.__dict__.get("open"), "__picklegate_original__"):
        module.open = _checked_open(  # type: ignore[attr-defined]
            module.__dict__.get("open", builtins.open))


def _open_checked(path: str, make: Callable[[int], Optional[_Checked]], eager: bool = True) -> Optional[_Checked]:
    """Opens ``path`` once and returns ``make(fd)`` (the file read and hashed from that descriptor),
    or ``None`` when it is not a regular file the library could read (the library then raises its
    own error, or reads a pipe whose pickles are judged one by one)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        if eager:
            with os.fdopen(os.dup(fd), "rb") as handle:
                _core.refuse_unread(handle, path)
        return make(fd)
    finally:
        os.close(fd)


def _guard_opened_path(
    original: _Loader,
    layout: "_core._Layout" = "whole",
    eager: bool = True,
    skip: Optional[Callable[[int], bool]] = None,
) -> _Loader:
    """Wraps a library call ``original(path, ...)`` that opens the path itself (``torch.load``,
    ``joblib.load``): the file is read and hashed once through one descriptor and judged; the
    library gets the real path, and its ``open`` of it returns the checked bytes (a
    ``_core.PinnedFile``). With the ``torch-zip`` layout the raw tensor bytes are read from the file
    after the check, and only those; with mmap options the library maps the data itself."""
    file_loader = _guard_file_object(original, layout)

    @functools.wraps(original)
    def guarded(f: Any, *args: Any, **kwargs: Any) -> Any:
        path = _local_path(f)
        if path is None:
            return file_loader(f, *args, **kwargs)
        name = os.fspath(f) if not isinstance(f, bytes) else f

        def pin(fd: int) -> Optional[_core.PinnedFile]:
            if skip is not None and skip(fd):
                return None
            return _core.PinnedFile(fd, layout, name)

        checked = _open_checked(path, pin, eager)
        if checked is None:
            return original(f, *args, **kwargs)
        with _serve(path, checked):
            return _core.guarded_container(checked, path, lambda: original(f, *args, **kwargs), eager)

    guarded.__picklegate_original__ = original  # type: ignore[attr-defined]
    return guarded


def _guard_file_object(original: _Loader, layout: "_core._Layout" = "whole", eager: bool = True) -> _Loader:
    """Wraps ``original(fileobj, ...)`` for a library that may seek anywhere in the file object it
    is given (joblib rewinds it itself). A real file is judged whole, from the same descriptor,
    and the library gets a ``PinnedFile`` over it at the same position (same name); the caller's
    file ends where the library left it. Any other file object (BytesIO, GzipFile, a socket) is
    given to the library as it is: each pickle it loads is judged on the bytes it reads."""

    @functools.wraps(original)
    def guarded(f: Any, *args: Any, **kwargs: Any) -> Any:
        if type(f) not in (io.BufferedReader, io.FileIO) or not _files.seekable(f):
            return original(f, *args, **kwargs)
        start = f.tell()
        view = _core.PinnedFile(f.fileno(), layout, getattr(f, "name", None))
        view.seek(start)

        def run() -> Any:
            try:
                return original(view, *args, **kwargs)
            finally:
                f.seek(view.tell())

        return _core.guarded_container(view, _files.source_name(f), run, eager)

    guarded.__picklegate_original__ = original  # type: ignore[attr-defined]
    return guarded


def _frozen(data: Any) -> Any:
    """``data`` as ``bytes``: any other buffer (shared memory, a bytearray another thread or process
    can write) is copied, and the copy is what is hashed and loaded, so the bytes that run are the
    bytes that were hashed. What is not a contiguous buffer is returned as it is (refused later)."""
    if type(data) is bytes:
        return data
    try:
        view = memoryview(data)
    except TypeError:
        return data
    with view:
        return view.tobytes() if view.contiguous else data


def _guard_file_loader(
    original: _Loader,
    eager: bool = True,
    adapt: Optional[Callable[[Optional[str], Any, Any], tuple[Any, Any]]] = None,
    own_unpickler: bool = False,
) -> _Loader:
    """Wraps ``original(f, ...)`` for a file object (or a path the library does not open through
    a module picklegate can see): read from its position to its end, judged, and given to the
    library from memory. A stream that cannot seek is given as it is, its pickle loads judged one
    by one, unless the library has its ``own_unpickler`` (TorchScript's C++ one, which Python's
    pickle never sees): then it is read whole and judged first, and so is a path that is not a
    regular file (a FIFO, a device)."""

    @functools.wraps(original)
    def guarded(f: Any, *args: Any, **kwargs: Any) -> Any:
        target: Union[_Checked, io.BytesIO]
        data: Any
        start: Optional[int]
        path = _local_path(f)
        if path is not None:
            checked = _open_checked(path, lambda fd: _core.PinnedFile(fd, "whole", os.fspath(f)), eager)
            if checked is not None:
                data, start, target = checked, None, checked
            elif own_unpickler and os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
                with builtins.open(path, "rb") as stream:
                    data, start = stream.read(), None
                target = io.BytesIO(data)
            else:
                return original(f, *args, **kwargs)  # the library raises its own error
        elif hasattr(f, "read") and _files.seekable(f):
            path = _files.source_name(f)
            if eager:
                _core.refuse_unread(f, path)
            start = f.tell()
            data = _frozen(f.read())
            target = io.BytesIO(data)
        elif hasattr(f, "read") and own_unpickler:
            path = _files.source_name(f)
            data, start = _frozen(f.read()), None
            target = io.BytesIO(data)
        else:
            return original(f, *args, **kwargs)  # a stream: its pickle loads are judged one by one
        if adapt is not None:
            args, kwargs = adapt(path, args, kwargs)

        def run() -> Any:
            try:
                return original(target, *args, **kwargs)
            finally:
                if start is not None:
                    f.seek(start + target.tell())

        return _core.guarded_container(data, path, run, eager)

    guarded.__picklegate_original__ = original  # type: ignore[attr-defined]
    return guarded


def _guard_bytes_loader(original: _Loader) -> _Loader:
    """Wraps ``original(data, ...)`` (dill.loads): the bytes are the container, copied first
    when they are not ``bytes``, and the library loads the copy that was hashed."""

    @functools.wraps(original)
    def guarded(data: Any, *args: Any, **kwargs: Any) -> Any:
        data = _frozen(data)
        return _core.guarded_container(data, None, lambda: original(data, *args, **kwargs), True)

    guarded.__picklegate_original__ = original  # type: ignore[attr-defined]
    return guarded


def _replace(module: ModuleType, name: str, make: Callable[[_Loader], _Loader]) -> None:
    current = getattr(module, name, None)
    if current is None or hasattr(current, "__picklegate_original__"):
        return
    setattr(module, name, make(current))


def _read_pickle(original: _Loader) -> _Loader:
    """pandas.read_pickle of a local path: an uncompressed file is read and hashed into memory that
    the unpickler gives back as it reads (``_core.HashedFile``); a compressed one is pinned whole.
    pandas infers compression from the file name, which a buffer does not have."""
    file_loader = _guard_file_loader(original)

    @functools.wraps(original)
    def read_pickle(f: Any, *args: Any, **kwargs: Any) -> Any:
        path = _local_path(f)
        if path is None or args or kwargs.get("storage_options") is not None:
            return file_loader(f, *args, **kwargs)
        from pandas.io.common import infer_compression

        compression = kwargs.get("compression", "infer")
        if compression == "infer":
            compression = infer_compression(path, "infer")
        whole = compression is not None
        checked = _open_checked(path, lambda fd: _core.PinnedFile(fd, "whole", os.fspath(f)) if whole else _core.HashedFile(fd, 0))
        if checked is None:
            return original(f, *args, **kwargs)
        kwargs = dict(kwargs, compression=compression)
        return _core.guarded_container(checked, path, lambda: original(checked, **kwargs), True)

    read_pickle.__picklegate_original__ = original  # type: ignore[attr-defined]
    return read_pickle


def _numeric_npy(fd: int) -> bool:
    """Whether the file at ``fd`` is an .npy whose header declares no Python objects: numpy never
    unpickles it, and a pickle it would run after a swap is judged on its own bytes."""
    try:
        from numpy.lib import format as npy_format

        head = io.BytesIO(os.pread(fd, 65536 + 16, 0))
        version = npy_format.read_magic(head)
        shape, fortran, dtype = npy_format._read_array_header(head, version)  # type: ignore[attr-defined]
        return not dtype.hasobject
    except Exception:
        return False


def _numpy_load(original: _Loader) -> _Loader:
    opened = _guard_opened_path(original, eager=False, skip=_numeric_npy)
    file_loader = _guard_file_loader(original, eager=False)

    @functools.wraps(original)
    def load(file: Any, *args: Any, **kwargs: Any) -> Any:
        allow_pickle = kwargs.get("allow_pickle", args[1] if len(args) > 1 else False)
        if not allow_pickle:
            return original(file, *args, **kwargs)  # numpy itself refuses object arrays
        path = _local_path(file)
        result = (opened if path is not None else file_loader)(file, *args, **kwargs)
        npz_type = getattr(sys.modules.get("numpy.lib.npyio"), "NpzFile", None)
        if npz_type is not None and isinstance(result, npz_type):
            _judge_members_later(result, path)
        return result

    load.__picklegate_original__ = original  # type: ignore[attr-defined]
    return load


def _judge_members_later(npz: Any, path: Optional[str]) -> None:
    """An .npz reads its members when indexed, from the checked bytes it was opened on: judge each
    object member as part of that file."""
    fp = npz.zip.fp
    data = fp if isinstance(fp, _core.PinnedFile) else fp.getvalue()
    callsite = _core.current_callsite()
    base = type(npz)

    class GuardedNpzFile(base):  # type: ignore[valid-type,misc]  # numpy's NpzFile, or its subclass
        def __getitem__(self, key: str) -> Any:
            return _core.guarded_container(data, path, lambda: base.__getitem__(self, key), False, callsite)

    GuardedNpzFile.__name__ = base.__name__
    GuardedNpzFile.__qualname__ = base.__qualname__
    npz.__class__ = GuardedNpzFile


def _torch_load(original: _Loader) -> _Loader:
    opened = _guard_opened_path(original, layout="torch-zip")

    @functools.wraps(original)
    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(f, (str, os.PathLike)) and os.fspath(f).endswith(".safetensors"):
            return original(f, *args, **kwargs)  # torch hands it to safetensors: no pickle
        try:
            return opened(f, *args, **kwargs)
        except pickle.UnpicklingError as error:
            # torch rewraps what its weights-only unpickler raised ("Weights only load failed"):
            # picklegate's refusal is given back as it was raised.
            refusal = error.__context__
            if isinstance(refusal, _errors._Refusal) and not isinstance(error, _errors._Refusal):
                raise refusal from None
            raise

    load.__picklegate_original__ = original  # type: ignore[attr-defined]
    return load


def _patch_torch(torch: Any) -> None:
    serialization = sys.modules.get("torch.serialization")
    if serialization is None:
        return
    _shadow_open(serialization)
    _replace(serialization, "load", _torch_load)
    torch.load = serialization.load
    _patch_torch_jit(torch)
    _patch_torch_c(torch._C)
    weights_only = sys.modules.get("torch._weights_only_unpickler")
    if weights_only is not None:
        _patch_torch_weights_only(weights_only)


#: torch's C entry points that read an archive and run its pickles and code: (the one taking a
#: path, the one taking the archive's bytes, the position of that argument).
_TORCH_C_LOADERS = (
    ("_load_for_lite_interpreter", "_load_for_lite_interpreter_from_buffer", 0),
    ("_load_mobile_module_from_file", "_load_mobile_module_from_bytes", 0),
    ("_load_jit_module_from_file", "_load_jit_module_from_bytes", 0),
    ("import_ir_module", "import_ir_module_from_buffer", 1),
)


def _patch_torch_c(c: Any) -> None:
    """torch's C loaders, for code that calls them directly rather than through the Python
    functions guarded above (inside those they run as they are): the archive is judged on its
    sha256, and a path is read once and its bytes given to the variant that takes bytes."""
    for by_path, by_bytes, at in _TORCH_C_LOADERS:
        path_loader, bytes_loader = getattr(c, by_path, None), getattr(c, by_bytes, None)
        if path_loader is None or bytes_loader is None or hasattr(path_loader, "__picklegate_original__"):
            continue
        setattr(c, by_bytes, _judged_bytes(bytes_loader, at))
        setattr(c, by_path, _judged_path(path_loader, bytes_loader, at))


def _judged_bytes(original: _Loader, at: int) -> _Loader:
    @functools.wraps(original)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if len(args) <= at:
            return original(*args, **kwargs)  # torch raises its own error
        data = _frozen(args[at])
        given = args[:at] + (data,) + args[at + 1 :]
        return _core.guarded_container(data, None, lambda: original(*given, **kwargs), True)

    guarded.__picklegate_original__ = original  # type: ignore[attr-defined]
    return guarded


def _judged_path(original: _Loader, bytes_loader: _Loader, at: int) -> _Loader:
    @functools.wraps(original)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        path = _local_path(args[at]) if len(args) > at else None
        if path is None or not os.path.exists(path) or os.path.isdir(path):
            return original(*args, **kwargs)  # torch raises its own error
        data: Any = _open_checked(path, lambda fd: _core.PinnedFile(fd, "whole", os.fspath(args[at])))
        if data is None:  # not a regular file (a FIFO): read it whole
            with builtins.open(path, "rb") as stream:
                data = stream.read()

        def run() -> Any:
            content = data if isinstance(data, bytes) else data.reopen().read()
            return bytes_loader(*args[:at], content, *args[at + 1 :], **kwargs)

        return _core.guarded_container(data, path, run, True)

    guarded.__picklegate_original__ = original  # type: ignore[attr-defined]
    return guarded


def _patch_torch_weights_only(weights_only: ModuleType) -> None:
    """torch.load(..., weights_only=True) (torch's default) unpickles with torch's own pure-Python
    unpickler, which Python's pickle never sees: its ``load`` is judged like
    ``pickle._Unpickler.load``, on the pickle's own bytes (a file a guard already judged whole runs
    under that verdict)."""
    unpickler = getattr(weights_only, "Unpickler", None)
    if unpickler is None or hasattr(unpickler.load, "__picklegate_original__"):
        return
    original = unpickler.load

    @functools.wraps(original)
    def load(self: Any) -> Any:
        from . import _interpose

        read, readline = self.read, self.readline
        file = getattr(read, "__self__", None)
        source = _files.source_name(file)
        if type(file) is _core.PinnedFile:
            return _core.guarded_container(file, source, lambda: original(self), True)
        start = 0
        if file is not None and _files.seekable(file):
            _core.refuse_unread(file, source)
            start = file.tell()
            data = _frozen(file.read())
            file.seek(start)
        else:
            data = _interpose._read_one_pickle(read, readline)
            file = None
        stream = io.BytesIO(data)

        def run() -> Any:
            # torch's unpickler reads only through these two, never the file itself, so the
            # file's position is set once, after the load, where the unguarded load leaves it
            # (a per-read replay cost a 10,000-tensor checkpoint 0.27 s).
            self.read, self.readline = stream.read, stream.readline
            try:
                return original(self)
            finally:
                self.read, self.readline = read, readline
                if file is not None:
                    file.seek(start + stream.tell())

        return _core.guarded_load(data, source, run)

    load.__picklegate_original__ = original  # type: ignore[attr-defined]
    unpickler.load = load


def _patch_torch_jit(torch: Any) -> None:
    """torch.jit.load: TorchScript's C++ unpickler runs the archive's pickles (and its code), never
    through Python's pickle, so the whole file is judged by its sha256 before it gets the bytes."""
    jit_serialization = sys.modules.get("torch.jit._serialization")
    if jit_serialization is None:
        return
    own_unpickler = functools.partial(_guard_file_loader, own_unpickler=True)
    _replace(jit_serialization, "load", own_unpickler)
    _replace(jit_serialization, "jit_module_from_flatbuffer", own_unpickler)
    torch.jit.load = jit_serialization.load


def _patch_torch_mobile(mobile: ModuleType) -> None:
    """The lite interpreter (``.ptl``) runs its archive's pickles and bytecode in C++, like
    TorchScript: the whole file (or stream) is judged by its sha256 before torch gets the bytes."""
    _replace(mobile, "_load_for_lite_interpreter", functools.partial(_guard_file_loader, own_unpickler=True))


def _canonical_archive(records: Iterable[tuple[str, bytes]]) -> bytes:
    """A torch.package's records (name, content) zipped in memory in the order given, stored at a
    fixed time: the same records always give the same bytes, and so the same sha256."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, content in records:
            archive.writestr(zipfile.ZipInfo("package/" + name, date_time=(1980, 1, 1, 0, 0, 0)), content)
    return buffer.getvalue()


def _directory_records(root: str) -> Iterator[tuple[str, bytes]]:
    """Every file of a torch.package unzipped into ``root``, in sorted order (symlinked
    directories not followed)."""
    for directory, subdirectories, files in os.walk(root):
        subdirectories.sort()
        for name in sorted(files):
            path = os.path.join(directory, name)
            with builtins.open(path, "rb") as f:
                yield os.path.relpath(path, root).replace(os.sep, "/"), f.read()


def _reader_records(reader: Any) -> Iterator[tuple[str, bytes]]:
    """Every record of a ``torch._C.PyTorchFileReader``, in sorted order."""
    for name in sorted(reader.get_all_records()):
        yield name, reader.get_record(name)


def _patch_torch_package(package_importer: ModuleType) -> None:
    """A torch.package archive carries module source that its pickles import: the whole archive is
    judged on its file's sha256 when it is opened (like a checkpoint), the importer reads only the
    checked bytes, and its pickles load under that verdict. A package unzipped into a directory, or
    given as a ``torch._C.PyTorchFileReader``, is read whole into an archive
    (``_canonical_archive``), judged on that archive's sha256, and the importer reads that archive,
    never the directory or the reader again."""
    importer = getattr(package_importer, "PackageImporter", None)
    if importer is None or hasattr(importer.__init__, "__picklegate_original__"):
        return
    original_init, original_load_pickle = importer.__init__, importer.load_pickle

    @functools.wraps(original_init)
    def __init__(self: Any, file_or_buffer: Any, *args: Any, **kwargs: Any) -> None:
        source: Optional[str]
        checked: Any
        reader: Any
        filename: Optional[str] = None  # what torch names the importer's file, when not "<binary>"
        path = _local_path(file_or_buffer) if isinstance(file_or_buffer, (str, os.PathLike)) else None
        file_reader = getattr(sys.modules.get("torch._C"), "PyTorchFileReader", None)
        if path is not None and os.path.isdir(path):
            source, filename = path, os.fspath(file_or_buffer)
            checked = _canonical_archive(_directory_records(path))
            reader = io.BytesIO(checked)
        elif file_reader is not None and isinstance(file_or_buffer, file_reader):
            source, filename = None, "<pytorch_file_reader>"
            checked = _canonical_archive(_reader_records(file_or_buffer))
            reader = io.BytesIO(checked)
        elif path is not None:
            checked = _open_checked(path, lambda fd: _core.PinnedFile(fd, "whole", os.fspath(file_or_buffer)))
            if checked is None:
                return original_init(self, file_or_buffer, *args, **kwargs)  # type: ignore[no-any-return]
            source, filename, reader = path, os.fspath(file_or_buffer), checked.reopen()
        elif hasattr(file_or_buffer, "read") and _files.seekable(file_or_buffer):
            source = _files.source_name(file_or_buffer)
            checked = _frozen(file_or_buffer.read())
            reader = io.BytesIO(checked)
        else:
            return original_init(self, file_or_buffer, *args, **kwargs)  # type: ignore[no-any-return]
        callsite = _core.current_callsite()
        _core.guarded_container(checked, source, lambda: original_init(self, reader, *args, **kwargs), True, callsite)
        if filename is not None:
            self.filename = filename
        self._picklegate_archive = (checked, source, callsite)

    @functools.wraps(original_load_pickle)
    def load_pickle(self: Any, *args: Any, **kwargs: Any) -> Any:
        archive = getattr(self, "_picklegate_archive", None)
        if archive is None:
            return original_load_pickle(self, *args, **kwargs)
        checked, source, callsite = archive
        return _core.guarded_container(checked, source, lambda: original_load_pickle(self, *args, **kwargs), True, callsite)

    __init__.__picklegate_original__ = original_init  # type: ignore[attr-defined]
    load_pickle.__picklegate_original__ = original_load_pickle  # type: ignore[attr-defined]
    importer.__init__, importer.load_pickle = __init__, load_pickle


def _patch_joblib(joblib: Any) -> None:
    numpy_pickle = sys.modules.get("joblib.numpy_pickle")
    if numpy_pickle is None:
        return
    _shadow_open(numpy_pickle)
    _shadow_open(sys.modules.get("joblib.numpy_pickle_compat"))
    utils = sys.modules.get("joblib.numpy_pickle_utils")
    is_raw_file = getattr(utils, "_is_raw_file", None)
    if is_raw_file is not None and not hasattr(is_raw_file, "__picklegate_original__"):
        # joblib maps arrays only from a real file: the checked file stands for the one it opened.
        def _is_raw_file(fileobj: object) -> bool:
            return type(fileobj) is _core.PinnedFile or bool(is_raw_file(fileobj))

        _is_raw_file.__picklegate_original__ = is_raw_file  # type: ignore[attr-defined]
        utils._is_raw_file = _is_raw_file  # type: ignore[union-attr]
    _replace(numpy_pickle, "load", lambda f: _guard_opened_path(f, layout="joblib"))
    joblib.load = numpy_pickle.load


def _patch_numpy(numpy: ModuleType) -> None:
    _shadow_open(sys.modules.get("numpy.lib._npyio_impl"))
    _replace(numpy, "load", _numpy_load)


def _patch_pandas(pandas: Any) -> None:
    pickle_io = sys.modules.get("pandas.io.pickle")
    if pickle_io is None:
        return
    _replace(pickle_io, "read_pickle", _read_pickle)
    pandas.read_pickle = pickle_io.read_pickle


def _patch_dill(dill: ModuleType) -> None:
    implementation = sys.modules.get("dill._dill")
    for module in (implementation, dill):
        if module is not None:
            _replace(module, "load", _guard_file_loader)
            _replace(module, "loads", _guard_bytes_loader)


PATCHES: dict[str, Callable[[Any], None]] = {"torch": _patch_torch, "torch.package.package_importer": _patch_torch_package, "torch.jit.mobile": _patch_torch_mobile, "torch._weights_only_unpickler": _patch_torch_weights_only, "joblib": _patch_joblib, "numpy": _patch_numpy, "pandas": _patch_pandas, "dill": _patch_dill}


class _PatchAfterExec(importlib.abc.Loader):
    """Runs the real loader, then patches the module it made."""

    def __init__(self, loader: importlib.abc.Loader, patch: Callable[[ModuleType], None]) -> None:
        self._loader = loader
        self._patch = patch

    def create_module(self, spec: ModuleSpec) -> Optional[ModuleType]:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._patch(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, name: str, path: Optional[Sequence[str]], target: Optional[ModuleType] = None
    ) -> Optional[ModuleSpec]:
        patch = PATCHES.get(name)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _PatchAfterExec(spec.loader, patch)
                return spec
        return None


_finder = _Finder()


def activate() -> None:
    """Patches the loader libraries already imported, and the ones imported from now on."""
    with _lock:
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)
        for name, patch in PATCHES.items():
            module = sys.modules.get(name)
            if module is not None:
                patch(module)
