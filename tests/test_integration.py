"""The integration runs (tests/support/integration): the CPU tier run under pytest through the
same code as ``python -m tests.support.integration.run_tests``, and the runner and run list
themselves."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
from torchtitan.config import ConfigManager

from tests.support.integration import OverrideDefinitions, run_tests
from tests.support.integration.checks import (
    CheckpointFolders,
    CommandResult,
    EveryRankLogged,
    FiniteLosses,
    LogContains,
    LogLacks,
    LossFalls,
    ResumeMatches,
    StepsRan,
)
from tests.support.integration.runs import CPU_RUNS, GPU_RUNS, RUNS
from torchtitan_ext.launch import resolve

ENGINE_REASON = run_tests.engine_missing_reason()


def _marks(run: OverrideDefinitions) -> list:
    marks = [pytest.mark.slow]
    if run.needs_engine:
        marks.append(pytest.mark.engine)
    return marks


@pytest.mark.parametrize(
    "run", [pytest.param(r, id=r.test_name, marks=_marks(r)) for r in CPU_RUNS]
)
def test_cpu_tier_run(run, tmp_path, record_property):
    outcome = run_tests.run_one(run, tmp_path, ngpu=2, engine_reason=ENGINE_REASON)
    record_property("outcome", outcome.status)
    record_property("seconds", round(outcome.seconds, 1))
    record_property("first_loss", outcome.first_loss)
    record_property("last_loss", outcome.last_loss)
    print(run_tests.summary_table([outcome]))
    assert outcome.status != "SKIP", f"skipped by the runner: {outcome.reason}"
    tail = run_tests._log_tail(outcome) if outcome.failures else ""
    assert outcome.status == "PASS", "\n".join(outcome.failures) + "\n" + tail


# --- the run list ---


def test_run_names_are_unique_and_tiers_fit_their_machines():
    names = [r.test_name for r in RUNS]
    assert len(names) == len(set(names))
    assert CPU_RUNS and GPU_RUNS
    for run in RUNS:
        assert re.fullmatch(r"[a-z0-9_]+", run.test_name), run.test_name
        assert run.checks, f"{run.test_name} checks nothing but the exit status"
    for run in CPU_RUNS:
        assert run.tier == "cpu" and run.processes <= 2, run.test_name
    for run in GPU_RUNS:
        assert run.tier == "gpu" and run.ngpu in (4, 8) and not run.comm_mode, run.test_name


def _degree(args: list[str], flag: str) -> int:
    return int(args[args.index(flag) + 1]) if flag in args else 1


def test_gpu_runs_use_every_gpu():
    for run in GPU_RUNS:
        for args in run.override_args:
            args = list(args)
            others = (
                _degree(args, "--parallelism.data_parallel_replicate_degree")
                * _degree(args, "--parallelism.tensor_parallel_degree")
                * _degree(args, "--parallelism.pipeline_parallel_degree")
            )
            if "--parallelism.data_parallel_shard_degree" in args:
                total = others * _degree(args, "--parallelism.data_parallel_shard_degree")
                assert total == run.ngpu, f"{run.test_name}: degrees multiply to {total}"
            else:  # torchtitan's default dp_shard (-1) takes the remaining ranks
                assert run.ngpu % others == 0, run.test_name


@pytest.mark.parametrize(
    "run, index",
    [
        pytest.param(r, i, id=f"{r.test_name}-{i}")
        for r in RUNS
        for i in range(len(r.override_args))
    ],
)
def test_every_command_parses(run, index):
    """Every command's flags are accepted by torchtitan's parser (tyro) for its config."""
    args = [str(a) for a in run.override_args[index]]
    ConfigManager().parse_args(
        ["--module", resolve(run.model, run.config), "--config", run.config, *args]
    )


# --- the checks, on made-up output ---


def _result(lines: list[str], returncode: int = 0) -> CommandResult:
    return CommandResult.parse(["x"], {}, returncode, 1.0, "\n".join(lines))


def _logged(full_losses: dict[int, float]) -> CommandResult:
    """A command that logged these losses to TensorBoard (and printed them)."""
    lines = [_step(step, loss, 0) for step, loss in full_losses.items()]
    return CommandResult.parse(["x"], {}, 0, 1.0, "\n".join(lines), full_losses=full_losses)


def _step(step: int, loss: float, rank: int | None = None) -> str:
    prefix = "" if rank is None else f"[rank{rank}]:"
    return (
        f"{prefix}[titan] - root - INFO - \x1b[31mstep: {step:2d}  \x1b[32mloss: {loss:8.5f}  "
        f"\x1b[33mgrad_norm:  1.2345  memory:  1.06GiB"
    )


def test_step_lines_are_parsed_with_and_without_rank_prefixes():
    result = _result([_step(1, 9.5, 0), _step(1, 9.5, 1), _step(2, 8.25, 0), "step: nope"])
    assert result.losses == {0: {1: 9.5, 2: 8.25}, 1: {1: 9.5}}
    assert _result([_step(3, 7.0)]).losses == {0: {3: 7.0}}  # comm_mode: one process


def test_checks_fail_when_they_should():
    good = _result([_step(1, 9.0, 0), _step(1, 9.0, 1), _step(2, 7.0, 0), _step(2, 7.0, 1)])
    assert FiniteLosses()([good]) == []
    assert LossFalls(margin=1.0)([good]) == []
    assert LossFalls(margin=3.0)([good])
    assert EveryRankLogged(ranks=2)([good]) == []
    # Losses are not compared (torchtitan logs them all-reduced); step numbers are.
    assert EveryRankLogged(ranks=2)([_result([_step(1, 9.0, 0), _step(1, 9.1, 1)])]) == []
    behind = _result([_step(1, 9.0, 0), _step(1, 9.0, 1), _step(2, 7.0, 0)])
    assert EveryRankLogged(ranks=2)([behind]) == [
        "command 0: rank 1 printed steps [1], rank 0 [1, 2]"
    ]
    assert EveryRankLogged(ranks=2)([_result([_step(1, 9.0, 0)])])  # rank 1 printed nothing
    assert FiniteLosses()([_result(["no steps"])])
    assert FiniteLosses()([_result([_step(1, math.nan, 0)])])
    assert StepsRan((1, 2))([good]) == [] and StepsRan((2,))([good])
    assert LogContains((r"grad_norm",))([good]) == [] and LogContains(("absent",))([good])
    assert LogLacks(("absent",))([good]) == [] and LogLacks((r"loss",))([good])

    # Resumed losses must equal the uninterrupted ones at full precision, bit for bit.
    reference = _logged({s: 10.0 - s + 1e-7 for s in (1, 2, 3, 4)})
    resumed = _logged({s: 10.0 - s + 1e-7 for s in (3, 4)})
    assert ResumeMatches(min_steps=2)([reference, resumed]) == []
    drifted = _logged({3: 7.0 + 1e-7, 4: 6.0 + 2e-7})  # printed (5 decimals) the same
    assert ResumeMatches()([reference, drifted]) == [
        f"step 4: resumed loss {6.0 + 2e-7!r} != uninterrupted loss {6.0 + 1e-7!r}"
    ]
    assert ResumeMatches(min_steps=3)([reference, resumed])  # too few steps
    assert ResumeMatches()([reference, _logged({5: 5.0})])  # step not in reference
    assert ResumeMatches()([_result([_step(1, 9.0, 0)]), resumed])  # no full-precision log


# --- the runner: outcomes, summary, exit status ---

QUICK_FAIL = OverrideDefinitions(
    test_name="quick_fail",
    test_descr="run_train.sh rejects an unknown CONFIG at once",
    config="no_such_config",
    tier="cpu",
    ngpu=1,
    needs_engine=False,
    override_args=[["--training.steps", "1"]],
    checks=(FiniteLosses(),),
)
NEEDS_ENGINE = OverrideDefinitions(
    test_name="needs_engine",
    test_descr="never launched in these tests",
    config="no_such_config",
    tier="cpu",
    ngpu=1,
    override_args=[["--training.steps", "1"]],
    checks=(FiniteLosses(),),
)


def test_runner_fails_a_failing_run_and_writes_the_summary(tmp_path, capsys):
    status = run_tests.main([str(tmp_path / "out"), "--tier", "cpu"], runs=[QUICK_FAIL])
    assert status == run_tests.EXIT_FAILED
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    (outcome,) = summary["runs"]
    assert outcome["name"] == "quick_fail" and outcome["status"] == "FAIL"
    assert outcome["commands"][0]["returncode"] == 1
    assert "CONFIG=no_such_config" in outcome["commands"][0]["command"]
    log = (tmp_path / "out" / "quick_fail" / "command-0.log").read_text()
    assert "Unknown CONFIG='no_such_config'" in log
    table = capsys.readouterr().out
    assert re.search(r"quick_fail\s+FAIL\s+[\d.]+\s+-\s+-\s+command 0 exited 1", table), table


def test_missing_engine_is_a_skip_never_a_pass(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run_tests, "engine_missing_reason", lambda: "AutoParallel missing (test)")
    status = run_tests.main([str(tmp_path / "a"), "--tier", "cpu"], runs=[NEEDS_ENGINE])
    assert status == run_tests.EXIT_NONE_PASSED  # nothing passed: not a success
    (outcome,) = json.loads((tmp_path / "a" / "summary.json").read_text())["runs"]
    assert outcome["status"] == "SKIP" and outcome["reason"] == "AutoParallel missing (test)"
    assert outcome["commands"] == []  # never launched
    table = capsys.readouterr().out
    assert re.search(r"needs_engine\s+SKIP .* AutoParallel missing \(test\)", table), table

    status = run_tests.main(
        [str(tmp_path / "b"), "--tier", "cpu", "--require-engine"], runs=[NEEDS_ENGINE]
    )
    assert status == run_tests.EXIT_FAILED
    (outcome,) = json.loads((tmp_path / "b" / "summary.json").read_text())["runs"]
    assert outcome["status"] == "FAIL"


_SKIPPING_ENGINE_TESTS = """
import pytest

pytestmark = pytest.mark.engine


@pytest.mark.skipif(True, reason="CPU support is inactive with an accelerator")
def test_accelerator():
    pass


def test_engine_missing():
    pytest.skip("Meta's AutoParallel is not installed: pip install -e '.[autoparallel]'")


def test_importorskip():
    pytest.importorskip("autoparallel_absent")
"""


@pytest.mark.parametrize("required", ["0", "1"])
def test_a_required_engine_fails_engine_skips_only(required, tmp_path, monkeypatch):
    """tests/conftest.py's rule, in a pytest session of its own: under
    TORCHTITAN_EXT_REQUIRE_ENGINE=1 an engine test skipped for want of the engine fails; one
    skipped deliberately (tests/test_cpu.py on a host with an accelerator) stays skipped."""
    import tests.conftest as conftest

    class Outcomes:
        def __init__(self):
            self.by_test = {}

        def pytest_runtest_logreport(self, report):
            if report.outcome != "passed" or report.when == "call":
                self.by_test.setdefault(report.nodeid.rsplit("::", 1)[1], report.outcome)

    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    engine: needs the engine\n")
    (tmp_path / "test_skipping_engine_tests.py").write_text(_SKIPPING_ENGINE_TESTS)
    monkeypatch.setenv(conftest.REQUIRE_ENGINE_ENV, required)
    outcomes = Outcomes()
    # no:unraisableexception: its five gc.collect() at exit take seconds with torch loaded.
    args = ["-q", "-p", "no:cacheprovider", "-p", "no:unraisableexception", "--rootdir"]
    args += [str(tmp_path), "-c", str(tmp_path / "pytest.ini"), "--import-mode=importlib"]
    args.append(str(tmp_path))
    status = pytest.main(args, plugins=[conftest, outcomes])
    engine_skip = "failed" if required == "1" else "skipped"
    assert outcomes.by_test == {
        "test_accelerator": "skipped",
        "test_engine_missing": engine_skip,
        "test_importorskip": engine_skip,
    }
    assert status == (pytest.ExitCode.TESTS_FAILED if required == "1" else pytest.ExitCode.OK)


def test_a_command_that_must_fail_may_fail_and_is_checked(tmp_path):
    run = dataclasses.replace(
        QUICK_FAIL,
        must_fail=(0,),
        checks=(LogContains((r"Unknown CONFIG='no_such_config'",), command=0),),
    )
    outcome = run_tests.run_one(run, tmp_path)
    assert outcome.status == "PASS", outcome.failures
    assert outcome.commands[0]["returncode"] == 1
    wrong = dataclasses.replace(run, checks=(LogContains(("never printed",)),))
    assert run_tests.run_one(wrong, tmp_path / "b").status == "FAIL"


def test_checkpoint_folders_are_recorded_after_each_command(tmp_path):
    for step, complete in ((2, True), (4, False)):
        (tmp_path / "checkpoint" / f"step-{step}").mkdir(parents=True)
        if complete:
            (tmp_path / "checkpoint" / f"step-{step}" / ".metadata").touch()
    folders = run_tests.checkpoint_folders(tmp_path)
    assert folders == {2: True, 4: False}
    result = CommandResult.parse(["x"], {}, 0, 1.0, "", folders)
    assert CheckpointFolders(0, complete=(2,), incomplete=(4,))([result]) == []
    assert CheckpointFolders(0, complete=(2, 4))([result])


def test_runner_selects_by_tier_filter_and_devices(tmp_path, capsys):
    assert run_tests.select(RUNS, tier="cpu", pattern="") == CPU_RUNS
    assert run_tests.select(RUNS, tier="gpu", pattern="qwen") == [
        r for r in GPU_RUNS if "qwen" in r.test_name
    ]
    assert run_tests.select(RUNS, tier="all", pattern="^nothing$") == []
    status = run_tests.main([str(tmp_path / "c"), "--filter", "^nothing$"])
    assert status == run_tests.EXIT_NONE_PASSED

    gpu = GPU_RUNS[0]
    outcome = run_tests.run_one(gpu, tmp_path, ngpu=8, accelerators=0)
    assert outcome.status == "SKIP"
    assert outcome.reason.startswith("GPU tier: needs 4 GPUs, 0 present")
    outcome = run_tests.run_one(gpu, tmp_path, ngpu=2, accelerators=8)
    assert outcome.status == "SKIP" and "--ngpu is 2" in outcome.reason
    fake = next(r for r in CPU_RUNS if r.comm_mode)
    assert fake.ngpu == 8 and fake.processes == 1  # one process: fits --ngpu 2


def test_list_prints_every_command_as_a_user_types_it(tmp_path, capsys):
    assert run_tests.main([str(tmp_path), "--tier", "all", "--list"]) == 0
    out = capsys.readouterr().out
    for run in RUNS:
        assert run.test_name in out
    assert "MODULE=llama3 CONFIG=llama3_debugmodel_shared_rope_autoparallel NGPU=1" in out
    assert "-m torch.distributed.run --nproc_per_node 2" in out
    assert "-m torchtitan.train --module config_registry --config llama3_debugmodel_auto" in out
    assert "NGPU=8 LOG_RANK=0 COMM_MODE=fake_backend" in out
    shim = f"PYTHONPATH={run_tests.REPO_ROOT}/tests/support/faults"
    assert re.search(rf"{re.escape(shim)}\S* TORCHTITAN_EXT_TEST_KILL_SAVE=step-4 ", out), out
