"""The exceptions picklegate raises, one class per kind of refusal or mistake.

They live in Python because the load refusals must subclass ``pickle.UnpicklingError``."""

import pickle
from typing import Optional, SupportsInt


class _Refusal:
    def __init__(
        self,
        message: str,
        callsite: Optional[str] = None,
        sha256: Optional[str] = None,
        size: Optional[SupportsInt] = None,
    ) -> None:
        super().__init__(message)  # type: ignore[call-arg]  # a mixin: an exception class follows
        self.callsite = callsite
        self.sha256 = sha256
        self.size = int(size) if size is not None else None

    def __reduce__(self) -> tuple[type, tuple[str, Optional[str], Optional[str], Optional[int]]]:
        # Plain data only, so a refusal in a worker reaches its parent under any [[trust]] rule
        # (picklegate admits exactly these classes there): no state dict, no other global.
        return (type(self), (str(self), self.callsite, self.sha256, self.size))


class PickleDeniedError(_Refusal, pickle.UnpicklingError):
    """The operator's policy (manifest and mode) refused a load or a global."""


class NoPickleError(_Refusal, pickle.UnpicklingError):
    """The code's own ``no_pickles()`` block (or ``only_objects``) refused a load."""


class BadTokenError(Exception):
    """``allow_pickles()`` was given a token that may not open a block here."""


class PolicyError(Exception):
    """The policy cannot be used: malformed manifest (with file:line:col), unknown mode, ...

    ``file``, ``line`` and ``column`` locate the mistake in a manifest or record file (``None``
    when not known or not about a file)."""

    def __init__(
        self,
        message: str,
        file: Optional[str] = None,
        line: Optional[int] = None,
        column: Optional[int] = None,
    ) -> None:
        super().__init__(message)
        self.file = file
        self.line = line
        self.column = column

    def __reduce__(self) -> tuple[type, tuple[str, Optional[str], Optional[int], Optional[int]]]:
        # The message alone in `args`, as before; the location travels beside it.
        return (type(self), (str(self), self.file, self.line, self.column))


class ScanError(pickle.UnpicklingError):
    """The bytes are not a well-formed pickle (truncated, unknown opcode, ...)."""
