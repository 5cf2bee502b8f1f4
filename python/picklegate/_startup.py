"""How a process starts under picklegate, and the one rule for when it cannot: ``enforce`` stops
(exit 78), ``warn``, ``record`` and ``off`` go on unguarded and say so; a host policy always stops.

Standard library only, as it must work where the package cannot load. Run as a script, with
``__name__ == "picklegate-start"``, by the start-up hook (``00-picklegate.pth``, which finds it
beside the package) and by the LD_PRELOAD library (which embeds it at build time and reads
``LENIENT`` and ``EX_CONFIG`` from this text): globals ``LOCATION`` (the package directory to load
picklegate from, or ``None`` to import it) and ``HOST_POLICY`` (a path, or ``None``).
``_activate`` imports it for the same rule."""

import os
import sys
from typing import NoReturn, Optional

#: Modes that go on when picklegate cannot be set up; ``enforce`` stops the process.
LENIENT = ("warn", "record", "off")
#: Exit status when picklegate cannot guard a process that must be guarded (EX_CONFIG, sysexits.h).
EX_CONFIG = 78


def configured() -> bool:
    """True when the operator asked for picklegate; empty values count as unset, as for ``PYTHON*``."""
    return bool(os.environ.get("PICKLEGATE_POLICY") or os.environ.get("PICKLEGATE_MODE"))


def lenient(mode: Optional[str], host_policy: Optional[str] = None) -> bool:
    """True when a process in ``mode`` (unset: ``enforce``) may go on without picklegate: never
    under a host policy."""
    return host_policy is None and (mode or "enforce").strip().lower() in LENIENT


def stop(reason: str) -> NoReturn:
    """Says why picklegate cannot guard this process, and ends it before any user code runs."""
    sys.stderr.write(f"picklegate: {reason}; stopping, rather than run unguarded\n")
    sys.stderr.flush()
    os._exit(EX_CONFIG)


def cannot_start(reason: str, host_policy: Optional[str]) -> None:
    """Applies the rule: stops the process, or says that it runs unguarded."""
    if not lenient(os.environ.get("PICKLEGATE_MODE"), host_policy):
        stop(reason)
    sys.stderr.write(f"picklegate: WARNING: {reason}; this process runs UNGUARDED\n")
    sys.stderr.flush()


def _load_package(location: str) -> None:
    """Imports the picklegate package found in ``location`` (it may not be on ``sys.path``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "picklegate", os.path.join(location, "__init__.py"), submodule_search_locations=[location]
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"no picklegate package in {location}")
    package = importlib.util.module_from_spec(spec)
    sys.modules["picklegate"] = package
    try:
        spec.loader.exec_module(package)
    except BaseException:
        del sys.modules["picklegate"]
        raise


def start(location: Optional[str], host_policy: Optional[str]) -> None:
    """Loads picklegate (from ``location`` unless it is imported already) and activates it: the host
    policy first, then the environment's settings."""
    try:
        if location is not None and "picklegate" not in sys.modules:
            _load_package(location)
        from picklegate._activate import from_environment, from_host_policy
    except Exception as error:
        where = f" from {location}" if location is not None else ""
        cannot_start(f"cannot load picklegate{where}: {error!r}", host_policy)
        return
    if host_policy is not None:
        from_host_policy(host_policy)
    if configured():
        from_environment()


if __name__ == "picklegate-start":
    start(globals()["LOCATION"], globals()["HOST_POLICY"])
