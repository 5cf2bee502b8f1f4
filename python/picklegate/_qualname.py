"""The qualified name of a code object on CPython 3.9 and 3.10, which do not keep it (``co_qualname``
is 3.11's): the name the compiler gave it, so a manifest's callsites mean the same on every version."""

import gc
import types


def of(code: types.CodeType) -> str:
    """The compiler puts a function's qualified name right after its code in the constants of the
    code that defines it; a function made from the code carries the same name, unless
    ``functools.wraps`` copied another over it (it then has ``__wrapped__``). Else ``co_name``.
    Called once per code object (the callsite cache keeps the answer)."""
    carried = None
    for referrer in gc.get_referrers(code):
        if type(referrer) is tuple:
            for index, item in enumerate(referrer[:-1]):
                following = referrer[index + 1]
                if item is code and type(following) is str and following.endswith(code.co_name):
                    return following
        elif isinstance(referrer, types.FunctionType) and referrer.__code__ is code and carried is None:
            if not hasattr(referrer, "__wrapped__"):
                carried = referrer.__qualname__
    return carried or code.co_name
