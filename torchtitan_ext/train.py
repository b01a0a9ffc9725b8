"""Training entry point used by run_train.sh: torchtitan's, plus CPU support for
torchtitan's own configs.

Our configs need nothing from here (they adapt themselves and build our Trainer, so
``python -m torchtitan.train --module config_registry`` works as well). A torchtitan config
(run_train.sh's fallback, e.g. CONFIG=llama3_debugmodel) builds torchtitan's Trainer, which
cannot run without an accelerator; without one, this entry point re-creates the loaded
config as our CPU-capable Trainer.Config, adapts it for CPU and points it at the bundled
assets when torchtitan's test assets are missing, all before command-line overrides apply.
"""

from __future__ import annotations

import torchtitan.train
from torchtitan.config import ConfigManager
from torchtitan.config.override import derive
from torchtitan.trainer import Trainer as TitanTrainer

from torchtitan_ext import cpu
from torchtitan_ext.assets import use_bundled_assets_if_missing
from torchtitan_ext.trainer import Trainer


class CPUConfigManager(ConfigManager):
    def _load_config(self, args: list[str]) -> tuple[object, list[str]]:
        config, args = super()._load_config(args)
        if cpu.use_cpu() and type(config) is TitanTrainer.Config:
            config = derive(config, Trainer.Config)
            use_bundled_assets_if_missing(config)
            cpu.adapt_config(config)
        return config, args


def main() -> None:
    # torchtitan.train.main() builds its ConfigManager by this module-level name.
    torchtitan.train.ConfigManager = CPUConfigManager
    torchtitan.train.main()


if __name__ == "__main__":
    main()
