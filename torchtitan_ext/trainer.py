"""torchtitan Trainer subclasses used by our named configs."""

from __future__ import annotations

from dataclasses import dataclass

from torchtitan.trainer import Trainer as TitanTrainer

from torchtitan_ext import cpu


class Trainer(TitanTrainer):
    """torchtitan's Trainer, made to run on CPU when no accelerator is present.

    torchtitan reads its device from module globals in ``Trainer.__init__``, so the CPU
    runtime must be installed before that; a Trainer subclass is the one hook that runs
    there whichever entry point built the config (``torchtitan.train`` or ours).
    """

    @dataclass(kw_only=True, slots=True)
    class Config(TitanTrainer.Config):
        pass

    def __init__(self, config: Config):
        cpu.install_runtime()
        super().__init__(config)
