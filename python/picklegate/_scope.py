"""The token API: ``no_pickles()`` narrows loads to nothing in its block and yields a token;
``allow_pickles(token)`` lifts exactly that block's narrowing. Scope is per context."""

import contextlib
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import Optional

from . import _core, _interpose

# Made by _core, which reads it on every load: no Python layer passes the scope down.
SCOPE = _core.scope_var()


def _here() -> tuple[int, int]:
    # asyncio is not imported here: it costs tens of ms at start-up, and until the program
    # imports it there is no task to be in.
    asyncio = sys.modules.get("asyncio")
    try:
        task = asyncio.current_task() if asyncio is not None else None
    except RuntimeError:
        task = None
    return threading.get_ident(), 0 if task is None else id(task)


@contextlib.contextmanager
def no_pickles() -> Iterator[_core.Token]:
    """Refuse every pickle load in this block (``NoPickleError``) unless the token lifts it."""
    _interpose.activate_implicitly()
    token = _core.new_token(*_here())
    reset = SCOPE.set(SCOPE.get().no_pickles(token))
    try:
        yield token
    finally:
        _core.close_token(token)
        SCOPE.reset(reset)


@contextlib.contextmanager
def allow_pickles(token: _core.Token, only_objects: Optional[Iterable[str]] = None) -> Iterator[None]:
    """Lift the narrowing of the ``no_pickles()`` block that made ``token``, back to what was
    allowed just outside it; with ``only_objects``, only for the listed ``sha256:...`` hashes."""
    if only_objects is not None:
        if isinstance(only_objects, str):
            raise TypeError("only_objects must be a list of 'sha256:...' strings, not one string")
        only_objects = list(only_objects)
    reset = SCOPE.set(SCOPE.get().allow(token, *_here(), only_objects))
    try:
        yield
    finally:
        SCOPE.reset(reset)
