"""The warnings a run prints that say nothing about it, silenced in one place, each with why
it is benign here and when it can go. Every other warning, and everything else torchtitan
prints, is left as it is. ``silence()`` is called by our Trainer and the dry run."""

from __future__ import annotations

import re
import warnings

# (category, start of the message, why it is benign). The message is matched from its start.
BENIGN: tuple[tuple[type[Warning], str, str], ...] = (
    (
        UserWarning,
        "DTensor random operators may not have complete support on cpu device mesh",
        "CPU meshes run DTensor's random ops with the CPU generator; parity tests compare "
        "every initialized value with 1-rank eager. Goes when DTensor supports CPU meshes.",
    ),
    (
        UserWarning,
        "DTensor manual_seed() may not have complete support on cpu device mesh",
        "torchtitan seeds every mesh, CPU ones too; as above.",
    ),
    (
        FutureWarning,
        "torch.distributed.config.compile_on_one_rank is deprecated",
        "AutoParallel a54c252 reads the old name of a torch setting it does not change. "
        "Goes with AutoParallel reading torch.compiler.config.",
    ),
    (
        UserWarning,
        "'set_vital' is deprecated",
        "torchdata's StatefulDataLoader calls torch.set_vital at each iterator; nothing is "
        "logged by it. Goes when torchdata stops calling it.",
    ),
)


def silence() -> None:
    """Ignore the BENIGN warnings in this process. Idempotent (the filters are replaced)."""
    for category, message, _ in BENIGN:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)
