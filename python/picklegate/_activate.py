"""Activation before user code runs: the ``.pth`` start-up hook and the LD_PRELOAD library call
``from_environment()``, which installs the operator's policy; the preload library, when the host has
``/etc/picklegate/policy.toml``, first calls ``from_host_policy()``."""

import os
import sys

from . import _core, _interpose

#: Modes that keep running when the policy cannot be used; ``enforce`` stops the process.
LENIENT = ("warn", "record", "off")
#: Exit status when the policy cannot be used under ``enforce`` (EX_CONFIG from sysexits.h).
EX_CONFIG = 78

_done = False


def _setting(name):
    return os.environ.get(name) or None  # empty counts as unset, as for PYTHON* variables


def _install(mode, policy, log):
    _core.configure(mode, policy, "environment", log, _setting("PICKLEGATE_RECORD"))
    _interpose.activate()


def from_environment():
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


def from_host_policy(path):
    """Installs the host-wide policy under ``enforce`` (origin ``host``: the environment and code can
    only make it stricter). A policy that cannot be used stops the process, whatever the environment."""
    try:
        _core.configure("enforce", path, "host", _setting("PICKLEGATE_LOG"), None)
        _interpose.activate()
    except Exception as error:
        sys.stderr.write(f"picklegate: {error}\npicklegate: host policy {path}: stopping, rather than run unguarded\n")
        sys.stderr.flush()
        os._exit(EX_CONFIG)


def _cannot_install(error, mode, policy, log):
    where = f"PICKLEGATE_POLICY={policy!r} PICKLEGATE_MODE={mode!r}"
    if (mode or "enforce").strip().lower() not in LENIENT:
        sys.stderr.write(f"picklegate: {error}\npicklegate: {where}: stopping, rather than run unguarded\n")
        sys.stderr.flush()
        os._exit(EX_CONFIG)
    logged = ", every load is logged" if mode.strip().lower() != "off" else ""
    sys.stderr.write(
        f"picklegate: WARNING: {error}\npicklegate: WARNING: {where}: the policy is not in force; "
        f"continuing in {mode} mode without it{logged}\n"
    )
    try:
        _install(mode, None, log)
    except Exception as second:
        sys.stderr.write(f"picklegate: WARNING: {second}; this process runs UNGUARDED\n")
