"""Run the integration runs of tests/support/integration/runs.py and report each one.

    python -m tests.support.integration.run_tests OUTPUT_DIR --tier cpu --ngpu 2 [--filter REGEX]

runs every run of the tier whose name matches REGEX (re.search) and that fits in --ngpu
devices, one after another, each command as a user would type it, with OUTPUT_DIR/NAME as
its dump folder (logs: OUTPUT_DIR/NAME/command-N.log). Prints a summary table (name,
outcome, seconds, first and last loss) and writes it to OUTPUT_DIR/summary.json.

Outcomes: PASS (every command exited 0 and every check held), FAIL, SKIP (with the reason:
AutoParallel missing, too few devices, no GPU for the GPU tier). A SKIP is never a PASS.
Exit status: 1 if any run failed, 5 if none passed (everything skipped or nothing
selected, as pytest's "no tests ran"), 0 otherwise. ``--require-engine`` turns the
AutoParallel-missing SKIPs into FAILs (CI jobs that install it use it). ``--list`` prints
the selected runs and their commands without running them.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.support.integration import OverrideDefinitions
from tests.support.integration.checks import CommandResult
from tests.support.integration.runs import RUNS
from tests.support.training import tensorboard_scalars

REPO_ROOT = Path(__file__).resolve().parents[3]
ENGINE_MISSING = "Meta's AutoParallel is not installed: pip install -e '.[autoparallel]'"
EXIT_FAILED, EXIT_NONE_PASSED = 1, 5
TB_LOSS_TAG = "loss_metrics/global_avg_loss"
_LOG_TAIL_LINES = 60


@dataclass
class RunOutcome:
    name: str
    descr: str
    tier: str
    ngpu: int
    status: str  # PASS, FAIL or SKIP
    reason: str = ""
    seconds: float = 0.0
    first_loss: float | None = None
    last_loss: float | None = None
    failures: list[str] = field(default_factory=list)
    commands: list[dict] = field(default_factory=list)
    """Per command: the shell line, exit status, seconds, log file, printed rank-0 losses."""

    def to_dict(self) -> dict:
        return asdict(self)


@functools.cache
def engine_missing_reason() -> str | None:
    """Why AutoParallel runs cannot run here, or None when Meta's AutoParallel imports."""
    from torchtitan_ext.parallelize.spec import require_autoparallel

    try:
        require_autoparallel()
    except ImportError as e:
        return f"{ENGINE_MISSING} ({e.__cause__ or e})"
    return None


def accelerator_count() -> int:
    import torch

    return torch.accelerator.device_count() if torch.accelerator.is_available() else 0


def command(run: OverrideDefinitions, index: int, dump_folder: Path) -> tuple[list[str], dict]:
    """The argv and the environment variables (set on top of the inherited ones) of one
    command of a run, as a user would type them."""
    args = [str(a) for a in run.override_args[index]]
    if run.launcher == "torchrun":
        from torchtitan_ext.launch import resolve

        ranks = ",".join(str(r) for r in range(run.ngpu))
        argv = [
            sys.executable, "-m", "torch.distributed.run",  # = torchrun, this interpreter
            "--nproc_per_node", str(run.ngpu),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0",
            "--local-ranks-filter", ranks, "--role", "rank", "--tee", "3",
            "-m", "torchtitan.train",
            "--module", resolve(run.model, run.config), "--config", run.config,
            "--dump_folder", str(dump_folder),
            *args,
        ]  # fmt: skip
        pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        env = {"PYTHONPATH": pythonpath}
    else:
        argv = [str(REPO_ROOT / "run_train.sh"), "--dump_folder", str(dump_folder), *args]
        env = {
            run.model_variable: run.model,
            "CONFIG": run.config,
            "NGPU": str(run.ngpu),
            "LOG_RANK": ",".join(str(r) for r in range(run.processes)),
            "PYTHON": sys.executable,
        }
        if run.comm_mode:
            env["COMM_MODE"] = run.comm_mode
    extra = {**run.env, **(run.command_env[index] if run.command_env else {})}
    for key, value in extra.items():
        value = value.format(repo=REPO_ROOT)
        if key == "PYTHONPATH":  # prepended to the launcher's (or the inherited) path
            value = os.pathsep.join(p for p in (value, env.get(key, os.environ.get(key))) if p)
        env[key] = value
    return argv, env


def checkpoint_folders(dump_folder: Path) -> dict[int, bool]:
    """step -> complete (has .metadata), for each <dump>/checkpoint/step-N folder."""
    folders = {}
    for path in (dump_folder / "checkpoint").glob("step-*"):
        match = re.fullmatch(r"step-(\d+)", path.name)
        if match and path.is_dir():
            folders[int(match[1])] = (path / ".metadata").is_file()
    return folders


def shell_line(argv: list[str], env: dict[str, str]) -> str:
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items() if k != "PYTHON")
    return f"{prefix} {shlex.join(argv)}".strip()


def skip_reason(
    run: OverrideDefinitions, *, ngpu: int, engine_reason: str | None, accelerators: int | None
) -> str | None:
    if run.processes > ngpu:
        return f"needs {run.processes} devices, --ngpu is {ngpu}"
    if run.tier == "gpu":
        present = accelerator_count() if accelerators is None else accelerators
        if present < run.processes:
            return f"GPU tier: needs {run.processes} GPUs, {present} present"
    if run.needs_engine and engine_reason:
        return engine_reason
    return None


def run_one(
    run: OverrideDefinitions,
    output_dir: Path,
    *,
    ngpu: int = 8,
    engine_reason: str | None = None,
    accelerators: int | None = None,
    require_engine: bool = False,
) -> RunOutcome:
    """Run every command of ``run`` in OUTPUT_DIR/NAME, stopping at the first that fails,
    then apply the run's checks."""
    outcome = RunOutcome(run.test_name, run.test_descr, run.tier, run.ngpu, "SKIP")
    reason = skip_reason(run, ngpu=ngpu, engine_reason=engine_reason, accelerators=accelerators)
    if reason:
        outcome.reason = reason
        if require_engine and reason == engine_reason:
            outcome.status = "FAIL"
            outcome.failures = [f"--require-engine: {reason}"]
        return outcome

    dump = Path(output_dir).resolve() / run.test_name
    dump.mkdir(parents=True, exist_ok=True)
    results: list[CommandResult] = []
    seen_tb_files: set[Path] = set()
    start = time.perf_counter()
    for index in range(len(run.override_args)):
        argv, env = command(run, index, dump)
        log_file = dump / f"command-{index}.log"
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                argv,
                cwd=REPO_ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                timeout=run.timeout,
            )
            returncode, log = proc.returncode, proc.stdout
        except subprocess.TimeoutExpired as e:
            partial = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
            returncode, log = (
                -1,
                (partial or "") + f"\n[run_tests] timed out after {run.timeout}s\n",
            )
        log_file.write_text(log)
        seconds = time.perf_counter() - t0
        # The commands of a run share <dump>/tb, and its run folders are named by the
        # minute: this command's losses are in the event file it added.
        tb_files = sorted((dump / "tb").rglob("events.out.tfevents.*"))
        new_tb_files = [f for f in tb_files if f not in seen_tb_files]
        seen_tb_files.update(new_tb_files)
        full_losses = (
            tensorboard_scalars(new_tb_files[-1], {"loss": TB_LOSS_TAG})["loss"]
            if new_tb_files
            else {}
        )
        result = CommandResult.parse(
            argv, env, returncode, seconds, log, checkpoint_folders(dump), full_losses
        )
        results.append(result)
        outcome.commands.append(
            {
                "command": shell_line(argv, env),
                "returncode": returncode,
                "seconds": round(result.seconds, 1),
                "log": str(log_file),
                "losses": result.rank_losses(0),
            }
        )
        if index in run.must_fail and returncode != -1:
            if returncode == 0:
                outcome.failures.append(f"command {index} exited 0 but must fail; log: {log_file}")
                break
        elif returncode != 0:
            what = "timed out" if returncode == -1 else f"exited {returncode}"
            outcome.failures.append(f"command {index} {what}; log: {log_file}")
            break
    outcome.seconds = time.perf_counter() - start

    if not outcome.failures:
        for check in run.checks:
            outcome.failures.extend(check(results))
    losses = [v for r in results for _, v in sorted(r.rank_losses(0).items())]
    if losses:
        outcome.first_loss, outcome.last_loss = losses[0], losses[-1]
    outcome.status = "FAIL" if outcome.failures else "PASS"
    return outcome


def select(
    runs: list[OverrideDefinitions], *, tier: str, pattern: str
) -> list[OverrideDefinitions]:
    regex = re.compile(pattern)
    return [
        run
        for run in runs
        if not run.disabled and (tier == "all" or run.tier == tier) and regex.search(run.test_name)
    ]


def summary_table(outcomes: list[RunOutcome]) -> str:
    def loss(value):
        return "-" if value is None else f"{value:.5f}"

    rows = [("run", "outcome", "seconds", "first loss", "last loss", "note")]
    for o in outcomes:
        note = o.reason if o.status == "SKIP" else (o.failures[0] if o.failures else "")
        rows.append(
            (o.name, o.status, f"{o.seconds:.1f}", loss(o.first_loss), loss(o.last_loss), note)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = []
    for row in rows:
        lines.append(
            "  ".join(c.ljust(w) for c, w in zip(row[:5], widths, strict=True)) + "  " + row[5]
        )
    counts = {s: sum(o.status == s for o in outcomes) for s in ("PASS", "FAIL", "SKIP")}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)


def exit_status(outcomes: list[RunOutcome]) -> int:
    if any(o.status == "FAIL" for o in outcomes):
        return EXIT_FAILED
    if not any(o.status == "PASS" for o in outcomes):
        return EXIT_NONE_PASSED
    return 0


def _log_tail(outcome: RunOutcome) -> str:
    if not outcome.commands:
        return ""
    log = Path(outcome.commands[-1]["log"]).read_text(errors="replace").splitlines()
    return "\n".join(log[-_LOG_TAIL_LINES:])


def main(argv: list[str] | None = None, runs: list[OverrideDefinitions] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.integration.run_tests", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("output_dir", type=Path, help="empty or new folder for dumps and logs")
    parser.add_argument("--tier", choices=["cpu", "gpu", "all"], default="cpu")
    parser.add_argument(
        "--ngpu", type=int, default=2, help="devices available; runs needing more are skipped"
    )
    parser.add_argument("--filter", default="", help="regular expression on run names")
    parser.add_argument(
        "--require-engine",
        action="store_true",
        help="fail, rather than skip, the runs that need AutoParallel when it is missing",
    )
    parser.add_argument("--list", action="store_true", help="print the runs and commands only")
    args = parser.parse_args(argv)

    selected = select(RUNS if runs is None else runs, tier=args.tier, pattern=args.filter)
    output_dir: Path = args.output_dir.resolve()
    if args.list:
        for run in selected:
            print(f"{run.test_name} ({run.tier}, NGPU={run.ngpu}): {run.test_descr}")
            for index in range(len(run.override_args)):
                print("   ", shell_line(*command(run, index, output_dir / run.test_name)))
        return 0 if selected else EXIT_NONE_PASSED
    if output_dir.exists() and any(output_dir.iterdir()):
        parser.error(f"{output_dir} is not empty")
    output_dir.mkdir(parents=True, exist_ok=True)

    engine_reason = engine_missing_reason() if any(r.needs_engine for r in selected) else None
    outcomes = []
    for number, run in enumerate(selected, 1):
        print(f"[{number}/{len(selected)}] {run.test_name}: {run.test_descr}", flush=True)
        outcome = run_one(
            run,
            output_dir,
            ngpu=args.ngpu,
            engine_reason=engine_reason,
            require_engine=args.require_engine,
        )
        outcomes.append(outcome)
        print(f"    {outcome.status} ({outcome.seconds:.1f}s) {outcome.reason}", flush=True)
        for failure in outcome.failures:
            print(f"    - {failure}", flush=True)
        if outcome.status == "FAIL" and outcome.commands:
            print(_log_tail(outcome), file=sys.stderr, flush=True)

    summary = {
        "tier": args.tier,
        "ngpu": args.ngpu,
        "filter": args.filter,
        "engine": engine_reason or "installed",
        "runs": [o.to_dict() for o in outcomes],
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(summary_table(outcomes))
    if not selected:
        print(f"no run of tier {args.tier!r} matches --filter {args.filter!r}", file=sys.stderr)
    return exit_status(outcomes)


if __name__ == "__main__":
    sys.exit(main())
