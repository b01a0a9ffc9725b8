"""Named training configs of torchtitan_ext, found by torchtitan's own entry point:

    python -m torchtitan.train --module config_registry --config llama3_debugmodel_cpu

Each config derives from torchtitan's own config function and changes only what it
names. Debug configs read the bundled tokenizer and dataset (torchtitan_ext/assets.py).
"""

from __future__ import annotations

import dataclasses

from torchtitan.models.llama3.config_registry import llama3_debugmodel

from torchtitan_ext import cpu
from torchtitan_ext.assets import ensure_assets
from torchtitan_ext.trainer import Trainer


def _derive(config, config_cls):
    """Re-create a torchtitan config object as ``config_cls`` (a subclass), field by field."""
    # dataclasses.fields() skips Configurable's _owner ClassVar, as it must.
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    return config_cls(**values)


def _debug_config(config, config_cls):
    """Our debug configs: bundled assets, CPU-sized sequences, CPU adaptations if needed."""
    config = _derive(config, config_cls)
    assets = ensure_assets()
    config.hf_assets_path = assets.tokenizer_path
    config.dataloader.dataset_path = assets.dataset_path
    # 8 x 256 tokens a step: a CPU step takes about a second on 2 cores.
    config.training.seq_len = 256
    config.training.steps = 20
    config.checkpoint.folder = "checkpoint"
    cpu.adapt_config(config)
    return config


def llama3_debugmodel_cpu() -> Trainer.Config:
    """torchtitan's llama3 debug model with torchtitan's own parallelization (FSDP),
    trainable on CPU: proves the CPU path independently of AutoParallel."""
    return _debug_config(llama3_debugmodel(), Trainer.Config)
