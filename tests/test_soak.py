"""The soak script (tests/support/soak.py) on a small count: the main job, eager, twice in a row on
2 ranks, every run exiting 0 with no abort text. Compiled runs (a cold compile: 2.5 min
each) and the full count (20 of 20 per mode) are run by hand:
``python -m tests.support.soak outputs/soak``."""

from __future__ import annotations

import pytest

from tests.support import soak


@pytest.mark.slow
@pytest.mark.engine
def test_main_job_runs_in_a_row_exit_cleanly(tmp_path, record_property):
    results = soak.soak(runs=2, modes=["eager"], steps=2, output=tmp_path)
    record_property("runs", [(r.mode, r.returncode, r.seconds) for r in results])
    failed = [r for r in results if not r.passed]
    assert not failed, "\n".join(
        f"{r.mode} {r.index}: exit {r.returncode} {r.abort}" for r in failed
    )
    assert all(r.steps == 2 for r in results), [r.steps for r in results]


def test_abort_text_fails_a_run_that_exited_0():
    run = soak.SoakRun("eager", 0, 0, 1.0, 2, abort="", log="")
    assert run.passed
    line = "terminate called without an active exception"
    assert soak.ABORT.search(line) and soak.ABORT.search("[rank1]: exitcode  : -6 (pid: 12)")
    assert not soak.ABORT.search("[rank0]: step:  2  loss:  8.65226  grad_norm: 14.4161")
    assert not soak.SoakRun("eager", 0, 0, 1.0, 2, abort=line, log="").passed
