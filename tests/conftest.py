"""Suite-wide hooks: the one rule for tests that need Meta's AutoParallel, and a summary of
what tests recorded with ``record_property``.

A test that needs AutoParallel carries the ``engine`` mark and nothing else: where the
engine is missing it is skipped here, with the reason and the install command. Where the
engine is meant to be present (``--require-engine`` or ``TORCHTITAN_EXT_REQUIRE_ENGINE=1``;
``.ci/run`` and the workflow job that installs it set the variable), nothing is skipped for
that reason, and any ``engine`` test that skips anyway for want of the engine (a broken
install, an importorskip: a reason that names AutoParallel) is reported as failed: a broken
install must fail, not pass quietly. Deliberate skips whose reason does not name the engine
(tests/test_cpu.py's "CPU support is inactive with an accelerator") stay skips.
"""

from __future__ import annotations

import os

import pytest

REQUIRE_ENGINE_ENV = "TORCHTITAN_EXT_REQUIRE_ENGINE"


@pytest.fixture(scope="module")
def two_fake_ranks():
    """A fake 2-rank process group for one test module: plans trace and solve, nothing runs."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    assert not dist.is_initialized()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield
    dist.destroy_process_group()


def pytest_addoption(parser):
    parser.addoption(
        "--require-engine",
        action="store_true",
        help=f"fail, never skip, tests that need Meta's AutoParallel (= {REQUIRE_ENGINE_ENV}=1)",
    )


def engine_required(config) -> bool:
    flag = os.environ.get(REQUIRE_ENGINE_ENV, "")
    if flag not in ("", "0", "1"):
        raise pytest.UsageError(f"{REQUIRE_ENGINE_ENV} must be 0 or 1, got {flag!r}")
    return config.getoption("--require-engine") or flag == "1"


def pytest_report_header(config):
    from tests.support.integration.run_tests import engine_missing_reason

    reason = engine_missing_reason()
    state = "installed" if reason is None else f"missing: {reason}"
    required = "required" if engine_required(config) else "optional"
    return f"AutoParallel ({required}): {state}"


def pytest_collection_modifyitems(config, items):
    from tests.support.integration.run_tests import engine_missing_reason

    reason = engine_missing_reason()
    if reason is None or engine_required(config):
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "engine" in item.keywords:
            item.add_marker(skip)


def skipped_for_want_of_engine(reason) -> bool:
    """A skip for want of the engine names it: our own reason (run_tests.ENGINE_MISSING), an
    importorskip ("could not import 'autoparallel...'"), an ImportError from inside it."""
    return "autoparallel" in str(reason).lower()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.skipped and "engine" in item.keywords and engine_required(item.config):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        if not skipped_for_want_of_engine(reason):
            return report  # a deliberate skip (an accelerator, a platform), not the engine's
        report.outcome = "failed"
        report.longrepr = (
            f"AutoParallel is required here ({REQUIRE_ENGINE_ENV}=1 or --require-engine), "
            f"but this engine test skipped: {reason}"
        )
    return report


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
