"""Activation before user code runs: the start-up hook and the LD_PRELOAD library (through
``_startup``) call ``from_environment()``, which installs the operator's policy; the preload library,
when the host has ``/etc/picklegate/policy.toml``, first calls ``from_host_policy()``."""

import os
import sys
from typing import Optional

from . import _core, _interpose, _startup

_done = False


def _setting(name: str) -> Optional[str]:
    return os.environ.get(name) or None  # empty counts as unset, as for PYTHON* variables


def _install(mode: Optional[str], policy: Optional[str], log: Optional[str]) -> None:
    _core.configure(mode, policy, "environment", log, _setting("PICKLEGATE_RECORD"))
    _interpose.activate()


def from_environment() -> None:
    """Installs ``PICKLEGATE_POLICY`` / ``PICKLEGATE_MODE`` (``PICKLEGATE_LOG``, ``PICKLEGATE_RECORD``) with origin
    ``environment``. In ``enforce`` a policy that cannot be used stops the process."""
    global _done
    if _done:
        return
    _done = True
    mode, policy, log = (_setting(f"PICKLEGATE_{n}") for n in ("MODE", "POLICY", "LOG"))
    try:
        _install(mode, policy, log)
    except Exception as error:
        _cannot_install(error, mode, policy, log)


def from_host_policy(path: str) -> None:
    """Installs the host-wide policy under ``enforce`` (origin ``host``: the environment and code can
    only make it stricter). A policy that cannot be used stops the process, whatever the environment."""
    try:
        _core.configure("enforce", path, "host", _setting("PICKLEGATE_LOG"), None)
        _interpose.activate()
    except Exception as error:
        _startup.stop(f"{error}\npicklegate: host policy {path}")


def _cannot_install(error: Exception, mode: Optional[str], policy: Optional[str], log: Optional[str]) -> None:
    where = f"PICKLEGATE_POLICY={policy!r} PICKLEGATE_MODE={mode!r}"
    if mode is None or not _startup.lenient(mode):
        _startup.stop(f"{error}\npicklegate: {where}")
    logged = ", every load is logged" if mode.strip().lower() != "off" else ""
    sys.stderr.write(
        f"picklegate: WARNING: {error}\npicklegate: WARNING: {where}: the policy is not in force; "
        f"continuing in {mode} mode without it{logged}\n"
    )
    try:
        _install(mode, None, log)
    except Exception as second:
        _startup.cannot_start(str(second), None)
