"""Integration runs in torchtitan's style: named training runs, each a CONFIG plus override
flags on NGPU ranks, run as a user runs them and checked from their output.

``runs.py`` lists the runs; ``run_tests.py`` runs them
(``python -m tests.support.integration.run_tests OUTPUT_DIR --tier cpu --ngpu 2``);
``tests/test_integration.py`` runs the CPU tier under pytest through the same code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from tests.support.integration.checks import Check

__all__ = ["Check", "OverrideDefinitions"]

Tier = Literal["cpu", "gpu"]
Launcher = Literal["run_train.sh", "torchrun"]


@dataclass(frozen=True)
class OverrideDefinitions:
    """One named integration run (torchtitan's tests/integration_tests shape, plus what we
    check). Every command of a run shares one dump folder, OUTPUT_DIR/test_name, so a
    later command can resume from an earlier one's checkpoints."""

    override_args: Sequence[Sequence[str]]
    """One argument list per command, run in order: the trainer flags after CONFIG."""

    test_descr: str
    test_name: str
    ngpu: int
    """Ranks (NGPU). With comm_mode, the ranks one process simulates."""

    config: str
    tier: Tier
    checks: Sequence[Check] = ()
    """Checked after every command exited 0; see checks.py."""

    needs_engine: bool = True
    """Needs Meta's AutoParallel; reported as SKIP, with the reason, when it is missing."""

    launcher: Launcher = "run_train.sh"
    """run_train.sh (CONFIG/NGPU/MODEL in the environment), or torchtitan's own entry point:
    ``torchrun --nproc_per_node NGPU -m torchtitan.train --module config_registry --config
    CONFIG`` from the repository root."""

    model_variable: Literal["MODEL", "MODULE"] = "MODEL"
    """How run_train.sh is told the torchtitan model: MODEL=llama3, or torchtitan's MODULE=."""

    model: str = "llama3"
    comm_mode: str = ""
    """run_train.sh's COMM_MODE: fake_backend plans an NGPU-rank job in one process."""

    env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment for every command. ``{repo}`` in a value is the repository root."""

    command_env: Sequence[Mapping[str, str]] = ()
    """Extra environment per command (empty, or one mapping per command), after ``env``."""

    must_fail: Sequence[int] = ()
    """Commands that must exit non-zero (e.g. killed on purpose); the run goes on after them.
    Any other command that fails ends the run."""

    timeout: int = 600
    """Seconds per command."""

    disabled: bool = False

    def __post_init__(self):
        if not self.override_args:
            raise ValueError(f"{self.test_name}: no command")
        if self.launcher == "torchrun" and self.comm_mode:
            raise ValueError(f"{self.test_name}: COMM_MODE is a run_train.sh setting")
        if self.command_env and len(self.command_env) != len(self.override_args):
            raise ValueError(f"{self.test_name}: command_env needs one mapping per command")
        if not all(0 <= i < len(self.override_args) for i in self.must_fail):
            raise ValueError(f"{self.test_name}: must_fail names a command that does not exist")

    @property
    def processes(self) -> int:
        """Devices (CPU: processes) the run occupies: 1 for a comm_mode dry run."""
        return 1 if self.comm_mode else self.ngpu

    def __repr__(self) -> str:
        return self.test_name
