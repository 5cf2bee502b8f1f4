"""Guards the loader libraries where users call them (torch.load, joblib.load, numpy.load,
pandas.read_pickle, dill.load/loads): each file is judged on its whole content's sha256."""

import functools
import importlib.abc
import io
import os
import sys
import threading

from . import _core, _files, _scope

_lock = threading.Lock()
_patched_modules = set()


def _local_path(f):
    if isinstance(f, (str, bytes, os.PathLike)):
        path = os.fsdecode(f)
        if "://" not in path:
            return os.path.abspath(path)
    return None


def _container(data, source, run, eager, callsite=None):
    where = _core.current_callsite() if callsite is None else callsite
    return _core.guarded_container(data, _scope.SCOPE.get(), source, run, lambda: where, eager)


def _read_whole(path, eager=False):
    """The file's bytes; when ``eager``, a load refused whatever the bytes is refused unread."""
    with open(path, "rb") as f:
        if eager:
            _core.refuse_unread(f, _scope.SCOPE.get(), path)
        return f.read()


def _guard_file_loader(original, mapped_keyword=None, eager=True, adapt=None):
    """Wraps ``original(f, ...)``: a local path is read once and the library gets the same bytes
    from memory; a file object is read from its position to its end. When the library maps the
    file itself (``mapped_keyword`` set, e.g. torch's ``mmap``), it gets ``/proc/self/fd/N`` of
    the descriptor picklegate hashed, so a file renamed over the path is not what it maps."""

    @functools.wraps(original)
    def guarded(f, *args, **kwargs):
        path = _local_path(f)
        mapped = mapped_keyword is not None and kwargs.get(mapped_keyword) and path is not None
        if mapped:
            fd = os.open(path, os.O_RDONLY)
            try:
                with os.fdopen(os.dup(fd), "rb") as handle:
                    if eager:
                        _core.refuse_unread(handle, _scope.SCOPE.get(), path)
                    data = handle.read()
                return _container(data, path, lambda: original(f"/proc/self/fd/{fd}", *args, **kwargs), eager)
            finally:
                os.close(fd)
        if path is not None:
            data, start = _read_whole(path, eager), None
        elif hasattr(f, "read") and _files.seekable(f):
            path = _files.source_name(f)
            if eager:
                _core.refuse_unread(f, _scope.SCOPE.get(), path)
            start = f.tell()
            data = f.read()
        else:
            return original(f, *args, **kwargs)  # a stream: its pickle loads are judged one by one
        if adapt is not None:
            args, kwargs = adapt(path, args, kwargs)
        target = io.BytesIO(data)

        def run():
            try:
                return original(target, *args, **kwargs)
            finally:
                if start is not None:
                    f.seek(start + target.tell())

        return _container(data, path, run, eager)

    guarded.__picklegate_original__ = original
    return guarded


def _guard_bytes_loader(original):
    """Wraps ``original(data, ...)`` (dill.loads): the bytes are the container."""

    @functools.wraps(original)
    def guarded(data, *args, **kwargs):
        return _container(data, None, lambda: original(data, *args, **kwargs), True)

    guarded.__picklegate_original__ = original
    return guarded


def _replace(module, name, make):
    current = getattr(module, name, None)
    if current is None or hasattr(current, "__picklegate_original__"):
        return
    setattr(module, name, make(current))


def _pandas_compression(path, args, kwargs):
    """pandas infers compression from the file name, which a buffer does not have."""
    if path is not None and not args and kwargs.get("compression", "infer") == "infer":
        from pandas.io.common import infer_compression

        kwargs = dict(kwargs, compression=infer_compression(path, "infer"))
    return args, kwargs


def _numpy_load(original):
    file_loader = _guard_file_loader(original, mapped_keyword="mmap_mode", eager=False)

    @functools.wraps(original)
    def load(file, *args, **kwargs):
        allow_pickle = kwargs.get("allow_pickle", args[1] if len(args) > 1 else False)
        if not allow_pickle:
            return original(file, *args, **kwargs)  # numpy itself refuses object arrays
        result = file_loader(file, *args, **kwargs)
        npz_type = getattr(sys.modules.get("numpy.lib.npyio"), "NpzFile", None)
        if npz_type is not None and isinstance(result, npz_type):
            _judge_members_later(result, file)
        return result

    load.__picklegate_original__ = original
    return load


def _judge_members_later(npz, file):
    """An .npz reads its members when indexed: judge each object member as part of the file."""
    path = _local_path(file)
    if path is None:
        return
    data = _read_whole(path) if not isinstance(npz.zip.fp, io.BytesIO) else npz.zip.fp.getvalue()
    callsite = _core.current_callsite()
    base = type(npz)

    class GuardedNpzFile(base):
        def __getitem__(self, key):
            return _container(data, path, lambda: base.__getitem__(self, key), False, callsite)

    GuardedNpzFile.__name__ = base.__name__
    GuardedNpzFile.__qualname__ = base.__qualname__
    npz.__class__ = GuardedNpzFile


def _patch_torch(torch):
    serialization = sys.modules.get("torch.serialization")
    if serialization is None:
        return
    _replace(serialization, "load", lambda f: _guard_file_loader(f, mapped_keyword="mmap"))
    torch.load = serialization.load
    _patch_torch_jit(torch)


def _patch_torch_jit(torch):
    """torch.jit.load: TorchScript's C++ unpickler runs the archive's pickles (and its code), never
    through Python's pickle, so the whole file is judged by its sha256 before it gets the bytes."""
    jit_serialization = sys.modules.get("torch.jit._serialization")
    if jit_serialization is None:
        return
    _replace(jit_serialization, "load", _guard_file_loader)
    torch.jit.load = jit_serialization.load


def _patch_joblib(joblib):
    numpy_pickle = sys.modules.get("joblib.numpy_pickle")
    if numpy_pickle is None:
        return
    _replace(numpy_pickle, "load", lambda f: _guard_file_loader(f, mapped_keyword="mmap_mode"))
    joblib.load = numpy_pickle.load


def _patch_numpy(numpy):
    _replace(numpy, "load", _numpy_load)


def _patch_pandas(pandas):
    pickle_io = sys.modules.get("pandas.io.pickle")
    if pickle_io is None:
        return
    _replace(pickle_io, "read_pickle", lambda f: _guard_file_loader(f, adapt=_pandas_compression))
    pandas.read_pickle = pickle_io.read_pickle


def _patch_dill(dill):
    implementation = sys.modules.get("dill._dill")
    for module in (implementation, dill):
        if module is not None:
            _replace(module, "load", _guard_file_loader)
            _replace(module, "loads", _guard_bytes_loader)


PATCHES = {"torch": _patch_torch, "joblib": _patch_joblib, "numpy": _patch_numpy, "pandas": _patch_pandas, "dill": _patch_dill}


class _PatchAfterExec(importlib.abc.Loader):
    """Runs the real loader, then patches the module it made."""

    def __init__(self, loader, patch):
        self._loader = loader
        self._patch = patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._patch(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
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


def activate():
    """Patches the loader libraries already imported, and the ones imported from now on."""
    with _lock:
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)
        for name, patch in PATCHES.items():
            module = sys.modules.get(name)
            if module is not None:
                patch(module)
