"""Names the code that asked for a load: the nearest frame outside pickle, picklegate and the
loader libraries, written ``module:qualname``."""

import sys

from . import _core

_is_loader = {}


def forget_loaders():
    """Drop cached answers after the manifest (and its ``loaders``) changed."""
    _is_loader.clear()


def current():
    frame = sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__") or "?"
        skip = _is_loader.get(module)
        if skip is None:
            skip = _is_loader[module] = _core.is_loader_module(module)
        if not skip:
            code = frame.f_code
            return f"{module}:{getattr(code, 'co_qualname', code.co_name)}"
        frame = frame.f_back
    return "?:?"
