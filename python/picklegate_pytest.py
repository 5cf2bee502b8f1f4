"""The pytest11 entry point: loads picklegate's pytest plugin. Where picklegate cannot load in this
interpreter, pytest keeps working, and ``--picklegate`` says why instead of running unguarded."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import pytest

_plugin: Optional[ModuleType]
try:
    _plugin = importlib.import_module("picklegate.pytest_plugin")
except Exception as error:  # noqa: BLE001 - whatever stops picklegate loading must not stop pytest
    _plugin = None
    _reason = f"{type(error).__name__}: {error}"

if _plugin is not None:
    # pytest finds hooks by name in this module: every hook of the plugin, as it is.
    globals().update({name: getattr(_plugin, name) for name in dir(_plugin) if name.startswith("pytest_")})
else:

    def pytest_addoption(parser: pytest.Parser) -> None:
        group = parser.getgroup("picklegate", "pickle load decisions (picklegate)")
        unavailable = f"UNAVAILABLE here: picklegate cannot load ({_reason})"
        group.addoption("--picklegate", default=None, help=unavailable)
        group.addoption("--picklegate-policy", default=None, help=unavailable)
        group.addoption("--picklegate-record", default=None, help=unavailable)

    def pytest_configure(config: pytest.Config) -> None:
        if any(config.getoption(name) is not None for name in ("picklegate", "picklegate_policy", "picklegate_record")):
            import pytest

            raise pytest.UsageError(
                f"--picklegate: picklegate cannot load in this Python ({sys.version.split()[0]}, {sys.executable}): "
                f"{_reason}; reinstall picklegate for this interpreter"
            )
