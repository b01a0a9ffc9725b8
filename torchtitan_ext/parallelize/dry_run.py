"""plan_model: parallelize a config's model as the Trainer does, on the meta device, without
training or initializing it (dry runs, tests, benchmarks)."""

from __future__ import annotations

import torch

from torchtitan_ext import benign_warnings, cpu


def plan_model(config, *, world_size: int, dump_folder: str):
    """Parallelize an AutoParallelTrainer.Config's model as the Trainer does. Needs a process
    group of ``world_size`` ranks (a fake one is enough). Returns the meta model, the
    parallel model and the component (its ``report`` and ``times``)."""
    from torchtitan.distributed import ParallelDims

    benign_warnings.silence()  # what the Trainer does first; meshes are then built on CPU
    cpu.install_runtime()
    config.model_spec.model.update_from_config(config=config)
    with torch.device("meta"):
        model = config.model_spec.model.build()
    component = config.autoparallel.build()
    parallel = component(
        model,
        parallel_dims=ParallelDims.from_config(config.parallelism, world_size),
        training=config.training,
        parallelism=config.parallelism,
        compile_config=config.compile,
        ac_config=config.activation_checkpoint,
        dump_folder=dump_folder,
    )
    return model, parallel, component
