"""Configs for the benchmarks: our AutoParallel debug configs and their baselines. The
benchmark profiles one step (collectives, kernel seconds) with our Trainer's --profile_step.

Every variant of a suite trains the same model (dense: llama3 debug, tied embeddings, SDPA,
plain cross-entropy; moe: the Qwen3 MoE debug config), on the same data and shapes; only
who parallelizes it differs.
"""

from __future__ import annotations

import config_registry
from torchtitan_ext.trainer import AutoParallelTrainer


def llama3_debugmodel_bench() -> AutoParallelTrainer.Config:
    """The AutoParallel debug config; --parallelize torchtitan gives torchtitan's FSDP."""
    return config_registry.llama3_debugmodel_autoparallel()


def _sum_gradients(process_group, bucket):
    """DDP comm hook: sum the ranks' gradients. torchtitan divides each rank's loss by the
    global token count, so the sum is the gradient of the global mean loss; DDP's default
    hook averages, which halves the gradients on 2 ranks (grad_norm 0.42 where the others
    have 0.82) and, through clipping, trains something else."""
    import torch.distributed as dist

    work = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


def _replicate(model, *, parallel_dims, compile_config, **kwargs):
    """torch's DDP (composable replicate: in place, FQNs unchanged), optionally with the
    whole model compiled, for the DDP baseline."""
    from torch.distributed._composable import replicate

    replicate(model, device_mesh=parallel_dims.world_mesh, bucket_cap_mb=25)
    model.register_comm_hook(None, _sum_gradients)
    if compile_config.enable and "model" in compile_config.components:
        model.compile()
    return model


def llama3_debugmodel_ddp_bench() -> AutoParallelTrainer.Config:
    """The same model and data with torch DDP."""
    config = llama3_debugmodel_bench()
    config.parallelize = "torchtitan"  # keep our parallelize_fn below, not AutoParallel
    config.model_spec.parallelize_fn = _replicate
    return config


def qwen3_moe_debug_bench() -> AutoParallelTrainer.Config:
    """The Qwen3 MoE AutoParallel debug config; --parallelize torchtitan with
    --parallelism.expert_parallel_degree gives torchtitan's EP."""
    return config_registry.qwen3_moe_debug_autoparallel()


def llama3_debugmodel_untied_bench() -> AutoParallelTrainer.Config:
    """The untied debug config (torchtitan's PP refuses tied embeddings); --parallelize
    torchtitan with --parallelism.pipeline_parallel_degree gives torchtitan's PP."""
    return config_registry.llama3_debugmodel_untied_autoparallel()
