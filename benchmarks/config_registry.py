"""Configs for the benchmarks: our AutoParallel debug config and its baselines, all run by a
Trainer that counts the collectives of one step with torch.profiler.

Every variant trains the same model (llama3 debug, tied embeddings, SDPA, plain
cross-entropy), on the same data and shapes; only who parallelizes it differs.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile
from torchtitan.tools.logging import logger

import config_registry
from torchtitan_ext.trainer import AutoParallelTrainer

# c10d op (what the program asks for) -> collective kind. The backend events
# ("gloo:all_reduce", "nccl:all_gather"...) carry the payload; gloo runs a reduce-scatter as
# an all-reduce of the whole input.
_C10D_KINDS = {
    "c10d::_allgather_base_": "all_gather",
    "c10d::allgather_": "all_gather",
    "c10d::allgather_into_tensor_coalesced_": "all_gather",
    "c10d::allgather_coalesced_": "all_gather",
    "c10d::_reduce_scatter_base_": "reduce_scatter",
    "c10d::reduce_scatter_": "reduce_scatter",
    "c10d::reduce_scatter_tensor_coalesced_": "reduce_scatter",
    "c10d::allreduce_": "all_reduce",
    "c10d::allreduce_coalesced_": "all_reduce",
    "c10d::alltoall_base_": "all_to_all",
    "c10d::broadcast_": "broadcast",
}


class BenchmarkTrainer(AutoParallelTrainer):
    @dataclass(kw_only=True, slots=True)
    class Config(AutoParallelTrainer.Config):
        profile_step: int = 0
        """Count this step's collectives with torch.profiler and write them to
        <dump_folder>/collectives/rank<R>.json; 0 = never. Keep it out of timed steps."""

    def train_step(self, data_iterator):
        if self.step + 1 != self.config.profile_step:
            return super().train_step(data_iterator)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            super().train_step(data_iterator)
        counts: Counter[str] = Counter()
        payload: Counter[str] = Counter()
        for event in prof.events():
            kind = _C10D_KINDS.get(event.name)
            if kind is not None:
                counts[kind] += 1
            elif event.name.startswith(("gloo:", "nccl:")) and event.input_shapes:
                numel = sum(torch.Size(s).numel() for s in event.input_shapes if s)
                payload[event.name] += numel * 4  # float32 training
        rank = torch.distributed.get_rank()
        folder = os.path.join(self.config.dump_folder, "collectives")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
            json.dump({"counts": counts, "payload_bytes": payload}, f, indent=2)
        logger.info(f"Collectives in step {self.step}: {dict(counts)}")


def _bench(config) -> BenchmarkTrainer.Config:
    return BenchmarkTrainer.Config.derived_from(config)


def llama3_debugmodel_bench() -> BenchmarkTrainer.Config:
    """The AutoParallel debug config; --parallelize torchtitan gives torchtitan's FSDP."""
    return _bench(config_registry.llama3_debugmodel_autoparallel())


def _replicate(model, *, parallel_dims, compile_config, **kwargs):
    """torch's DDP (composable replicate: in place, FQNs unchanged), optionally with the
    whole model compiled, for the DDP baseline."""
    from torch.distributed._composable import replicate

    replicate(model, device_mesh=parallel_dims.world_mesh, bucket_cap_mb=25)
    if compile_config.enable and "model" in compile_config.components:
        model.compile()
    return model


def llama3_debugmodel_ddp_bench() -> BenchmarkTrainer.Config:
    """The same model and data with torch DDP."""
    config = llama3_debugmodel_bench()
    config.parallelize = "torchtitan"  # keep our parallelize_fn below, not AutoParallel
    config.model_spec.parallelize_fn = _replicate
    return config
