"""picklegate's pytest plugin: ``--picklegate=enforce|warn|record|report`` decides or records
every pickle load a test suite makes and attributes each load to the test that made it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Generator
from typing import Any, Literal, Optional

import pytest

from . import _core, install
from ._errors import PickleDeniedError

MODES = ("enforce", "warn", "record", "report")
OUTSIDE_TESTS = "<collection or session>"
#: A decision as the observer sees it: the JSON event (SPEC.md: Logs) as a dict.
Event = dict[str, Any]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("picklegate", "pickle load decisions (picklegate)")
    group.addoption("--picklegate", choices=MODES, default=None,
                    help="enforce: fail tests that load a pickle the policy does not list; warn: list them; "
                         "record: write every load to --picklegate-record; report: print an inventory")
    group.addoption("--picklegate-policy", metavar="PATH", default=None, help="the manifest (TOML v1)")
    group.addoption("--picklegate-record", metavar="PATH", default=None,
                    help="the record file for --picklegate=record (and report)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", 'picklegate(allow=["sha256:..."]): pickles this test may load beyond the policy')
    mode = config.getoption("picklegate")
    if mode is not None:
        config.pluginmanager.register(Gate(config, mode), "picklegate-gate")


def _digest(text: str) -> str:
    return text.strip().lower().removeprefix("sha256:")


class Gate:
    """Installs picklegate for the session and watches every load decision through the observer.

    ``enforce`` runs the core in ``warn`` mode and refuses, from the observer and before the load
    runs, what neither the policy nor the test's marker allows; a test that swallows the error
    still fails."""

    def __init__(self, config: pytest.Config, mode: str) -> None:
        self.mode = mode
        self.policy: Optional[str] = config.getoption("picklegate_policy")
        record = config.getoption("picklegate_record")
        self.scratch: Optional[str] = None
        if mode == "record" and record is None:
            raise pytest.UsageError("--picklegate=record needs --picklegate-record PATH")
        if mode == "report" and record is None:
            self.scratch = tempfile.mkdtemp(prefix="picklegate-report-")
            record = os.path.join(self.scratch, "records.jsonl")
        self.current_test = OUTSIDE_TESTS
        self.current_allow: set[str] = set()
        self.loads: list[tuple[str, Event]] = []  # (test, event) for every load decision
        self.refused: dict[str, list[str]] = {}  # test nodeid -> refusal messages not yet reported
        core_modes: dict[str, Literal["warn", "record"]] = {"enforce": "warn", "warn": "warn", "record": "record", "report": "record"}
        core_mode = core_modes[mode]
        install(policy=self.policy, mode=core_mode, record=record)
        _core.set_observer(self.observe)

    def observe(self, event: Event) -> None:
        self.loads.append((self.current_test, event))
        if self.mode != "enforce" or event["decision"] != "warn" or event["sha256"] in self.current_allow:
            return
        message = _core.test_refusal(
            self.policy, event["size"], event["sha256"], event["callsite"], event["reason"], event["globals"])
        self.refused.setdefault(self.current_test, []).append(message)
        raise PickleDeniedError(message, callsite=event["callsite"], sha256=event["sha256"], size=event["size"])

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Generator[None, None, None]:
        self.current_test = item.nodeid
        self.current_allow = {
            _digest(sha) for marker in item.iter_markers("picklegate") for sha in marker.kwargs.get("allow", ())
        }
        try:
            yield
        finally:
            self.current_test, self.current_allow = OUTSIDE_TESTS, set()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, Any, None]:
        outcome = yield
        report = outcome.get_result()
        refusals = self.refused.pop(item.nodeid, [])
        if refusals:
            text = "\n\n".join(refusals)
            report.sections.append(("picklegate", text))
            if report.passed:
                report.outcome = "failed"
                report.longrepr = f"picklegate: this test loaded a pickle the policy does not allow " \
                                  f"(the error was caught by the code under test)\n\n{text}"

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.mode == "report":
            rows = self.loads
            title = f"picklegate inventory: {len(rows)} pickle loads"
        elif self.mode == "warn":
            rows = [(test, event) for test, event in self.loads if event["decision"] == "warn"]
            title = f"picklegate: {len(rows)} loads the policy does not allow"
        else:
            return
        terminalreporter.write_sep("=", title)
        table = [("TEST", "CALLSITE", "SHA256", "SIZE", "GLOBALS")] + [
            (test, e["callsite"], e["sha256"], str(e["size"]), ", ".join(e["globals"]) or "-") for test, e in rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(4)]
        for row in table:
            terminalreporter.write_line("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[4])

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        _core.set_observer(None)
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)
