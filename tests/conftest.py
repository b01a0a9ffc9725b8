"""Shows what tests recorded with ``record_property`` (loss-parity differences, integration
run times and losses) in pytest's terminal summary, also when they pass."""

from __future__ import annotations


def pytest_terminal_summary(terminalreporter):
    lines = []
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) != "call" or not report.user_properties:
                continue
            values = ", ".join(f"{k}={v}" for k, v in report.user_properties)
            lines.append(f"{report.nodeid} [{report.outcome}]: {values}")
    if lines:
        terminalreporter.write_sep("-", "recorded values")
        for line in sorted(lines):
            terminalreporter.write_line(line)
