"""What picklegate needs to know of a file object before it reads a load's bytes: whether it
can seek back, and the path it came from (for logs and records)."""

import os
from typing import Optional


def seekable(file: object) -> bool:
    try:
        return bool(file.seekable())  # type: ignore[attr-defined]
    except Exception:
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
