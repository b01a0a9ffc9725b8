"""The aliases of the original model, kept on the parallel one: captured before tracing,
restored after apply (or a graph cache load), kept tied through init_weights, and checked
after parallelization and again after init_weights (--autoparallel.alias_check).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

from torch import nn
from torchtitan.tools.logging import logger

from torchtitan_ext.aliases import AliasError, AliasMap
from torchtitan_ext.parallelize.report import PhaseTimes


class AliasGuard:
    """One start's alias groups and the original model's names (every FQN, and state_dict
    keys), with the phases' seconds recorded in ``times``."""

    def __init__(
        self, model: nn.Module, *, check: Literal["error", "warn", "off"], times: PhaseTimes
    ):
        t0 = time.perf_counter()
        self.check_mode = check
        self.times = times
        self.alias_map = AliasMap.capture(model)
        self.names = module_names(model)
        times.alias_capture = time.perf_counter() - t0
        if self.alias_map:
            logger.info(f"AutoParallel: captured aliases before tracing:\n{self.alias_map}")

    def restore(self, parallel_model: nn.Module, *, after_init: Callable[[nn.Module], None]):
        """Re-register the alias names the engine dropped, keep groups tied through init,
        check names now and, once init_weights gave them values, again; then
        ``after_init(parallel_model)``."""
        t0 = time.perf_counter()
        restored = self.alias_map.restore(parallel_model)
        self.alias_map.keep_tied(parallel_model)
        self.times.alias_restore = time.perf_counter() - t0
        if self.alias_map:
            logger.info(
                "AutoParallel: alias names re-registered on the parallel model: "
                f"{restored or 'none (the engine kept them)'}"
            )
        self.check(parallel_model, when="after parallelization", names=True)
        logger.info(
            f"AutoParallel: {len(self.names['parameters'])} parameter, "
            f"{len(self.names['buffers'])} buffer and {len(self.names['state_dict'])} "
            "state_dict names match the original model"
        )
        # Runs after AutoParallel's own DTensor-aware init_weights wrapper and keep_tied.
        init_weights = parallel_model.init_weights

        def timed_init_weights(*args, **kwargs):
            t0 = time.perf_counter()
            result = init_weights(*args, **kwargs)
            self.times.init = time.perf_counter() - t0
            self.check(parallel_model, when="after init_weights")
            after_init(parallel_model)
            return result

        parallel_model.init_weights = timed_init_weights

    def check(self, module: nn.Module, *, when: str, names: bool = False) -> None:
        """verify() the alias groups and, with ``names``, check that the module has exactly
        the original model's FQNs (remove_duplicate=False) and state_dict keys."""
        if self.check_mode == "off":
            return
        t0 = time.perf_counter()
        try:
            self.alias_map.verify(module)
            if names:
                _check_same_names(self.names, module_names(module))
        except AliasError as e:
            if self.check_mode == "error":
                raise
            logger.warning(f"AutoParallel: alias check {when} failed: {e}")
        self.times.alias_verify += time.perf_counter() - t0


def module_names(module: nn.Module) -> dict[str, list[str]]:
    return {
        "parameters": [n for n, _ in module.named_parameters(remove_duplicate=False)],
        "buffers": [n for n, _ in module.named_buffers(remove_duplicate=False)],
        "state_dict": list(module.state_dict(keep_vars=True)),
    }


def _check_same_names(expected: dict[str, list[str]], actual: dict[str, list[str]]) -> None:
    problems = []
    for kind, names in expected.items():
        missing = sorted(set(names) - set(actual[kind]))
        extra = sorted(set(actual[kind]) - set(names))
        if missing:
            problems.append(f"{kind} missing on the parallel model: {', '.join(missing)}")
        if extra:
            problems.append(f"{kind} the original model does not have: {', '.join(extra)}")
    if problems:
        raise AliasError(
            "parallel model names differ from the original:\n  " + "\n  ".join(problems)
        )
