"""What an integration run must show, checked on the output of its commands.

Each check returns a list of failure messages (empty: it holds). Commands are indexed as in
the run's ``override_args``; ``command=None`` means every command.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from tests.support.training import parse_steps


@dataclass
class CommandResult:
    """One command of a run: what ran and what it printed."""

    argv: list[str]
    env: dict[str, str]
    """The environment variables the runner set (not the inherited ones)."""
    returncode: int
    seconds: float
    log: str
    losses: dict[int, dict[int, float]] = field(default_factory=dict)
    """rank -> step -> loss, as printed (5 decimals)."""
    checkpoints: dict[int, bool] = field(default_factory=dict)
    """After the command: step -> whether <dump>/checkpoint/step-N is complete (.metadata)."""
    full_losses: dict[int, float] = field(default_factory=dict)
    """step -> loss at full precision, from the TensorBoard run this command wrote (runs
    with --metrics.enable_tensorboard --metrics.save_tb_folder tb); empty otherwise."""

    @classmethod
    def parse(
        cls, argv, env, returncode, seconds, raw_log: str, checkpoints=None, full_losses=None
    ) -> CommandResult:
        log, losses, _ = parse_steps(raw_log)
        return cls(
            list(argv), dict(env), returncode, seconds, log, losses,
            dict(checkpoints or {}), dict(full_losses or {}),
        )  # fmt: skip

    def rank_losses(self, rank: int = 0) -> dict[int, float]:
        return self.losses.get(rank, {})


def _commands(results: list[CommandResult], command: int | None) -> list[tuple[int, CommandResult]]:
    if command is None:
        return list(enumerate(results))
    return [(command % len(results), results[command])]


class Check:
    def __call__(self, results: list[CommandResult]) -> list[str]:
        raise NotImplementedError

    def describe(self) -> str:
        return repr(self)


@dataclass(frozen=True)
class LogContains(Check):
    """Every pattern (a regular expression) matches a line of the command's output."""

    patterns: tuple[str, ...]
    command: int | None = None

    def __call__(self, results):
        failures = []
        for index, result in _commands(results, self.command):
            for pattern in self.patterns:
                if not re.search(pattern, result.log, flags=re.MULTILINE):
                    failures.append(f"command {index}: no line matches {pattern!r}")
        return failures


@dataclass(frozen=True)
class LogLacks(Check):
    """No line of the command's output matches any of the patterns."""

    patterns: tuple[str, ...]
    command: int | None = None

    def __call__(self, results):
        failures = []
        for index, result in _commands(results, self.command):
            for pattern in self.patterns:
                match = re.search(pattern, result.log, flags=re.MULTILINE)
                if match:
                    failures.append(f"command {index}: unexpected line {match.group(0)!r}")
        return failures


@dataclass(frozen=True)
class StepsRan(Check):
    """Rank 0 printed exactly these steps (e.g. a resumed run starts after its checkpoint)."""

    steps: tuple[int, ...]
    command: int | None = None

    def __call__(self, results):
        failures = []
        for index, result in _commands(results, self.command):
            steps = tuple(sorted(result.rank_losses(0)))
            if steps != self.steps:
                failures.append(f"command {index}: printed steps {steps}, expected {self.steps}")
        return failures


@dataclass(frozen=True)
class FiniteLosses(Check):
    """Every printed loss is finite, and at least one step was printed."""

    command: int | None = None

    def __call__(self, results):
        failures = []
        for index, result in _commands(results, self.command):
            values = [v for losses in result.losses.values() for v in losses.values()]
            if not values:
                failures.append(f"command {index}: printed no step line")
            elif not all(math.isfinite(v) for v in values):
                failures.append(f"command {index}: non-finite loss in {result.losses}")
        return failures


@dataclass(frozen=True)
class LossFalls(Check):
    """Rank ``rank``'s last loss is below its first by more than ``margin`` (under pipeline
    parallelism the last stage's ranks print the loss)."""

    margin: float = 0.0
    command: int | None = 0
    rank: int = 0

    def __call__(self, results):
        failures = []
        for index, result in _commands(results, self.command):
            losses = [v for _, v in sorted(result.rank_losses(self.rank).items())]
            if len(losses) < 2:
                failures.append(f"command {index}: fewer than 2 steps printed: {losses}")
            elif not losses[-1] < losses[0] - self.margin:
                failures.append(
                    f"command {index}: loss did not fall by more than {self.margin}: {losses}"
                )
        return failures


@dataclass(frozen=True)
class EveryRankLogged(Check):
    """Ranks 0..ranks-1 each printed step lines, and all the same step numbers. (Not their
    losses: torchtitan logs the loss and grad norm all-reduced over ranks, so every rank
    prints the same values whatever each computed.)"""

    ranks: int
    command: int | None = None

    def __call__(self, results):
        failures = []
        for index, result in _commands(results, self.command):
            if sorted(result.losses) != list(range(self.ranks)):
                failures.append(
                    f"command {index}: step lines from ranks {sorted(result.losses)}, "
                    f"expected {list(range(self.ranks))}"
                )
                continue
            steps = sorted(result.losses[0])
            for rank in range(1, self.ranks):
                if sorted(result.losses[rank]) != steps:
                    failures.append(
                        f"command {index}: rank {rank} printed steps "
                        f"{sorted(result.losses[rank])}, rank 0 {steps}"
                    )
        return failures


@dataclass(frozen=True)
class ResumeMatches(Check):
    """A resumed command's losses equal the reference command's on every step both logged,
    exactly: at full precision from TensorBoard (both commands must have logged there); the
    resumed command must log at least ``min_steps`` steps, all also in the reference."""

    resumed: int = 1
    reference: int = 0
    min_steps: int = 1

    def __call__(self, results):
        resumed = results[self.resumed].full_losses
        reference = results[self.reference].full_losses
        if not reference:
            return [f"command {self.reference} logged no full-precision losses (TensorBoard)"]
        if len(resumed) < self.min_steps:
            return [f"command {self.resumed} printed {len(resumed)} steps (< {self.min_steps})"]
        extra = sorted(set(resumed) - set(reference))
        if extra:
            return [f"command {self.resumed} printed steps {extra} the reference did not"]
        failures = []
        for step, loss in sorted(resumed.items()):
            if loss != reference[step]:
                failures.append(
                    f"step {step}: resumed loss {loss!r} != uninterrupted loss {reference[step]!r}"
                )
        return failures


@dataclass(frozen=True)
class CheckpointFolders(Check):
    """After the command, <dump>/checkpoint holds exactly these step folders: ``complete``
    ones with DCP's .metadata, ``incomplete`` ones without (a save that did not finish)."""

    command: int
    complete: tuple[int, ...] = ()
    incomplete: tuple[int, ...] = ()

    def __call__(self, results):
        found = results[self.command].checkpoints
        complete = tuple(sorted(s for s, done in found.items() if done))
        incomplete = tuple(sorted(s for s, done in found.items() if not done))
        if (complete, incomplete) != (self.complete, self.incomplete):
            return [
                f"command {self.command}: checkpoint folders complete {complete}, incomplete "
                f"{incomplete}; expected complete {self.complete}, incomplete {self.incomplete}"
            ]
        return []


def max_resume_difference(results: list[CommandResult], resumed: int, reference: int) -> float:
    """Largest |loss difference| over the steps both commands logged at full precision."""
    a, b = results[resumed].full_losses, results[reference].full_losses
    return max((abs(a[s] - b[s]) for s in set(a) & set(b)), default=0.0)
