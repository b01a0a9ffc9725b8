"""Soak: run the main job N times in a row on 2 ranks, eager and compiled, and report every
exit code and any abort text.

    python -m tests.support.soak OUTPUT_DIR [--runs 20] [--modes eager,compiled] [--steps 20]

Each run is ``MODEL=llama3 CONFIG=llama3_debugmodel_autoparallel NGPU=2 ./run_train.sh``
(``--compile.enable`` for compiled), rerun as a user reruns it: one dump folder per mode
(OUTPUT_DIR/MODE, where compiled runs find the compile caches of the ones before), a log
per run (OUTPUT_DIR/MODE-NN.log).
A run passes when it exits 0 and its log has no abort text (a C++ terminate, a signal, a
torchrun child failure). Prints one line per run and a summary per mode, writes
OUTPUT_DIR/soak.json, and exits 1 unless every run passed. tests/test_soak.py runs a
smaller count.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = "llama3_debugmodel_autoparallel"
MODES = {"eager": (), "compiled": ("--compile.enable",)}
# What a run that died in native code or lost a rank leaves in its log.
ABORT = re.compile(
    r"terminate called|Aborted|core dumped|Segmentation fault|Fatal Python error|"
    r"ChildFailedError|exitcode\s*:\s*-\d+|SIGKILL|SIGABRT|SIGSEGV"
)


@dataclass
class SoakRun:
    mode: str
    index: int
    returncode: int
    seconds: float
    steps: int
    """Step lines rank 0 printed."""
    abort: str
    """The first abort line of the log, or empty."""
    log: str

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and not self.abort


def run_once(mode: str, index: int, *, steps: int, output: Path) -> SoakRun:
    dump = output / mode
    env = {
        **os.environ,
        "MODEL": "llama3",
        "CONFIG": CONFIG,
        "NGPU": "2",
        "LOG_RANK": "0,1",
        "PYTHON": sys.executable,
    }
    cmd = [
        str(REPO_ROOT / "run_train.sh"),
        f"--dump_folder={dump}",
        "--training.steps", str(steps),
        "--metrics.disable_color_printing",
        *MODES[mode],
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seconds = time.perf_counter() - start
    log_path = output / f"{mode}-{index:02d}.log"
    log_path.write_text(proc.stdout)
    aborts = [line.strip() for line in proc.stdout.splitlines() if ABORT.search(line)]
    printed = len(re.findall(r"^\[rank0\]:.*\bstep:\s*\d+\s+loss:", proc.stdout, re.MULTILINE))
    return SoakRun(
        mode=mode,
        index=index,
        returncode=proc.returncode,
        seconds=round(seconds, 1),
        steps=printed,
        abort=aborts[0] if aborts else "",
        log=str(log_path),
    )


def soak(*, runs: int, modes: list[str], steps: int, output: Path) -> list[SoakRun]:
    output.mkdir(parents=True, exist_ok=True)
    results = []
    for mode in modes:
        for index in range(runs):
            result = run_once(mode, index, steps=steps, output=output)
            results.append(result)
            state = "ok" if result.passed else "FAILED"
            print(
                f"{mode} {index + 1}/{runs}: {state}, exit {result.returncode}, "
                f"{result.steps} steps, {result.seconds:.0f} s"
                + (f", abort: {result.abort}" if result.abort else ""),
                flush=True,
            )
    for mode in modes:
        mine = [r for r in results if r.mode == mode]
        good = sum(r.passed for r in mine)
        codes = sorted({r.returncode for r in mine})
        print(f"soak {mode}: {good} of {len(mine)} runs exited 0 cleanly (exit codes {codes})")
    summary = {"runs": runs, "steps": steps, "results": [asdict(r) for r in results]}
    (output / "soak.json").write_text(json.dumps(summary, indent=2))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--steps", type=int, default=20, help="steps per run (the config: 20)")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {list(MODES)}")
    results = soak(runs=args.runs, modes=modes, steps=args.steps, output=args.output)
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
