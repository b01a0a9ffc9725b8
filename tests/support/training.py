"""Run ./run_train.sh as a user would and read the step lines it prints."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# torchrun --tee prefixes each line with [rankN]: ; a comm_mode run (one process) does not.
_STEP = re.compile(
    r"^(?:\[rank(?P<rank>\d+)\]:)?.*\bstep:\s*(?P<step>\d+)\s+loss:\s*(?P<loss>\S+)"
    r".*grad_norm:\s*(?P<grad_norm>\S+)"
)


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def parse_steps(
    raw_log: str,
) -> tuple[str, dict[int, dict[int, float]], dict[int, dict[int, float]]]:
    """The log without colors, and rank -> step -> loss and grad norm from its step lines."""
    log = _ANSI.sub("", raw_log)
    losses: dict[int, dict[int, float]] = {}
    grad_norms: dict[int, dict[int, float]] = {}
    for line in log.splitlines():
        match = _STEP.match(line)
        if match:
            rank, step = int(match["rank"] or 0), int(match["step"])
            losses.setdefault(rank, {})[step] = _float(match["loss"])
            grad_norms.setdefault(rank, {})[step] = _float(match["grad_norm"])
    return log, losses, grad_norms


@dataclass
class Run:
    returncode: int
    log: str
    losses: dict[int, dict[int, float]] = field(default_factory=dict)
    """rank -> step -> loss"""
    grad_norms: dict[int, dict[int, float]] = field(default_factory=dict)

    def check(self) -> Run:
        assert self.returncode == 0, f"training exited {self.returncode}:\n{self.log[-6000:]}"
        return self

    def rank_losses(self, rank: int = 0) -> list[float]:
        return [loss for _, loss in sorted(self.losses[rank].items())]


def run_train(
    config: str,
    *args: str,
    ngpu: int,
    dump_folder: Path,
    log_ranks: str = "0",
    env: dict[str, str] | None = None,
    timeout: float = 600,
    model: str = "llama3",
) -> Run:
    """Run run_train.sh with CONFIG=config, NGPU=ngpu; colors off, step lines parsed."""
    full_env = {
        **os.environ,
        "MODEL": model,
        "CONFIG": config,
        "NGPU": str(ngpu),
        "LOG_RANK": log_ranks,
        "PYTHON": sys.executable,
        **(env or {}),
    }
    cmd = [
        str(REPO_ROOT / "run_train.sh"),
        f"--dump_folder={dump_folder}",
        "--metrics.disable_color_printing",
        *args,
    ]
    proc = subprocess.run(
        cmd,
        cwd=REPO_ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    log, losses, grad_norms = parse_steps(proc.stdout)
    return Run(returncode=proc.returncode, log=log, losses=losses, grad_norms=grad_norms)


def tensorboard_scalars(path: Path, tags: dict[str, str]) -> dict[str, dict[int, float]]:
    """name -> step -> value of each TensorBoard tag in one run folder (<dump>/tb/<time>) or
    event file, at full precision (the step lines print 5 decimals)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(path))
    events.Reload()
    present = set(events.Tags()["scalars"])
    return {
        name: {s.step: s.value for s in events.Scalars(tag)} if tag in present else {}
        for name, tag in tags.items()
    }


def fault_env(fault: str) -> dict[str, str]:
    """The environment that injects ``fault`` into a run (tests/support/faults/sitecustomize.py)."""
    path = os.pathsep.join([str(REPO_ROOT / "tests" / "support" / "faults"), str(REPO_ROOT)])
    return {"PYTHONPATH": path, "TORCHTITAN_EXT_TEST_FAULT": fault}
