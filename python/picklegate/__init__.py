"""picklegate decides every pickle load before one opcode runs: only reviewed pickles, by
sha256, at the callsites a manifest names; a token-guarded ``no_pickles()``; a no-pickle mode.

PYTEST_DONT_REWRITE: the start-up hook imports this package before pytest can mark its plugin's
package for assertion rewriting; the marker keeps pytest from warning (an error under ``-W error``)."""

from __future__ import annotations

import os as _os
import typing as _typing

from . import _core, _interpose
from ._errors import BadTokenError, NoPickleError, PickleDeniedError, PolicyError, ScanError
from ._scope import allow_pickles, no_pickles

Token = _core.Token

if _typing.TYPE_CHECKING:
    from typing_extensions import Buffer

    from ._core import _Mode, _Origin

__all__ = [
    "BadTokenError",
    "NoPickleError",
    "PickleDeniedError",
    "PolicyError",
    "ScanError",
    "Token",
    "allow_pickles",
    "install",
    "no_pickles",
    "sha256",
    "state",
]

__version__: str = _core.__version__  # Cargo.toml's, compiled into _core


def install(
    policy: str | _os.PathLike[str] | None = None,
    mode: _Mode | None = None,
    record: str | _os.PathLike[str] | None = None,
    backstop_only: bool = False,
) -> str:
    """Guard every pickle load in this process.

    ``policy`` is a manifest path (TOML v1); ``mode`` is ``enforce`` (the default),
    ``warn``, ``record`` or ``off``. ``enforce`` without a policy refuses every load.
    ``record`` is the file ``record`` mode appends each load to (default: ``PICKLEGATE_RECORD``).
    Of two calls (or a call and the environment's or the host's policy) the stricter wins, whatever
    their order: off < record < warn < enforce with a manifest < enforce without one; a looser call is
    ignored with an ``install-ignored`` warning. Returns a one-line description.
    Where this Python's ``_pickle`` cannot be redirected, ``enforce`` raises ``PolicyError``;
    ``backstop_only=True`` (or ``PICKLEGATE_BACKSTOP_ONLY=1``) accepts the audit-hook backstop alone."""
    path = _os.fspath(policy) if policy is not None else None
    record_path = _os.fspath(record) if record is not None else _os.environ.get("PICKLEGATE_RECORD")
    description = _core.configure(mode, path, "code", _os.environ.get("PICKLEGATE_LOG"), record_path)
    if backstop_only:
        _core.accept_backstop_only()
    _interpose.activate()
    return description


def state() -> tuple[_Mode, str | None, _Origin] | None:
    """``(mode, manifest path or None, who set it)``, or ``None`` when not installed."""
    return _core.current_state()


def sha256(data: Buffer) -> str:
    """The sha256 hex digest picklegate uses for a bytes-like object."""
    return _core.sha256(data)
