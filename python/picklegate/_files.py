"""What picklegate needs to know of a file object before it reads a load's bytes: whether it
can seek back, and the path it came from (for logs and records)."""

import os
import stat
from typing import Optional


def seekable(file: object) -> bool:
    """Whether the file can be read to its end and sought back: it says it is seekable and, if it
    has a descriptor, that is a regular file (a device such as ``/dev/zero`` says it is seekable
    but never ends: it is read as a stream, only as far as the pickle goes; red team 5 E9)."""
    try:
        if not file.seekable():  # type: ignore[attr-defined]
            return False
    except Exception:
        return False
    try:
        fd = file.fileno()  # type: ignore[attr-defined]
    except Exception:
        return True  # no descriptor (BytesIO and the like): its end is its end
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except (OSError, TypeError, ValueError):
        return False


def source_name(file: object) -> Optional[str]:
    """The absolute path a file object was opened from, or ``None``."""
    name = getattr(file, "name", None)
    if isinstance(name, (str, bytes)):
        try:
            return os.path.abspath(os.fsdecode(name))
        except (TypeError, ValueError):
            return None
    return None
