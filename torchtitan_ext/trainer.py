"""torchtitan Trainer subclasses used by our named configs."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.distributed.tensor import DTensor
from torchtitan.components.loss import ChunkedLossWrapper
from torchtitan.config import Configurable
from torchtitan.tools.logging import logger
from torchtitan.trainer import Trainer as TitanTrainer

from torchtitan_ext import assets, benign_warnings, cpu, patches
from torchtitan_ext.aliases import AliasError, storage_bytes
from torchtitan_ext.dump_folder import write_whole, written_whole
from torchtitan_ext.parallelize import AliasAwareAutoParallel
from torchtitan_ext.tied_stages import FIRST, LAST, TiedStages

# c10d op (what the program asks for) -> collective kind, for Trainer's collective count.
# The backend events ("gloo:all_reduce", "nccl:all_gather"...) carry the payload; gloo runs
# a reduce-scatter as an all-reduce of the whole input.
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
    "c10d::alltoall_": "all_to_all",
    "c10d::broadcast_": "broadcast",
}
# Kernels whose time Trainer's profiled step reports (CPU only: there an op's duration is
# its kernel's; on an accelerator it would be the launch). Together they are most of a
# dense step here and the same calls under every parallelization of a dense model, so
# they bound how much faster one parallelization can step than another.
_KERNELS = {
    "aten::mm": "matmul",
    "aten::bmm": "matmul",
    "aten::addmm": "matmul",
    "aten::_grouped_mm": "matmul",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward": "attention",
}


class Trainer(TitanTrainer):
    """torchtitan's Trainer, made to run on CPU when no accelerator is present.

    torchtitan reads its device from module globals in ``Trainer.__init__``, so the CPU
    runtime must be installed before that; a Trainer subclass is the one hook that runs
    there whichever entry point built the config (``torchtitan.train`` or ours).
    """

    @dataclass(kw_only=True, slots=True)
    class Config(TitanTrainer.Config):
        grad_dump_step: int = 0
        """Save every parameter's full gradient at this step, as the backward left it
        (before clipping), under every name including alias names, to
        <dump_folder>/grads/step-N.pt from rank 0; 0 = never. For comparing numerics
        between parallelizations of the same model and weights."""

        profile_step: int = 0
        """Profile this step with torch.profiler: the collectives it runs (count and
        payload per kind) and, on CPU, the seconds its matmul and attention kernels take,
        written to <dump_folder>/step_profile/rank<R>.json; 0 = never. Profiling slows the
        step: keep it out of timed steps."""

    def __init__(self, config: Config):
        benign_warnings.silence()
        cpu.install_runtime()
        assets.ensure_assets_for(config)  # the tokenizer is read in torchtitan's __init__
        self._state_bytes: dict[str, int] | None = None
        """Bytes of this rank's state, recorded after the first step."""
        super().__init__(config)

    def close(self) -> None:
        super().close()
        # torchtitan's main() calls close() after a successful run (no exception being
        # handled), and also while an exception propagates.
        if sys.exc_info()[0] is None:
            cpu.skip_interpreter_teardown_after_success()

    def train_step(self, data_iterator):
        first = self._state_bytes is None
        with contextlib.ExitStack() as stack:
            stack.enter_context(patches.clip_grad_norm_seam(self._clip_grad_norm))
            if self.step == self.config.profile_step:
                stack.enter_context(self._profile_step())
            super().train_step(data_iterator)
        if first:
            self._record_state_bytes()

    def _clip_grad_norm(self, clip, parameters, *args, **kwargs) -> torch.Tensor:
        """torchtitan's clip_grad_norm_ (``clip``), after the backward: the gradients are
        dumped here at grad_dump_step."""
        if self.step == self.config.grad_dump_step:
            self._dump_gradients()
        return clip(parameters, *args, **kwargs)

    @contextlib.contextmanager
    def _profile_step(self):
        """Count the c10d collectives of the step (what actually ran, whatever a plan
        says) and the bytes the backend moved for them; on CPU, time its kernels."""
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            yield
        counts: Counter[str] = Counter()
        payload: Counter[str] = Counter()
        kernel_s: Counter[str] = Counter()
        time_kernels = cpu.use_cpu()
        for event in prof.events():
            kind = _C10D_KINDS.get(event.name)
            if kind is not None:
                counts[kind] += 1
            elif event.name.startswith(("gloo:", "nccl:")) and event.input_shapes:
                numel = sum(torch.Size(s).numel() for s in event.input_shapes if s)
                payload[event.name] += numel * 4  # float32 training
            elif event.name in _KERNELS and time_kernels:
                parent = event.cpu_parent  # _grouped_mm's CPU fallback calls mm per group
                while parent is not None and parent.name not in _KERNELS:
                    parent = parent.cpu_parent
                if parent is None:
                    kernel_s[_KERNELS[event.name]] += event.cpu_time_total / 1e6
        record = {"step": self.step, "counts": counts, "payload_bytes": payload}
        if kernel_s:
            record["kernel_s"] = kernel_s
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        folder = os.path.join(self.config.dump_folder, "step_profile")
        os.makedirs(folder, exist_ok=True)
        write_whole(os.path.join(folder, f"rank{rank}.json"), json.dumps(record, indent=2))
        kernels = ", ".join(f"{k} {v:.3f} s" for k, v in sorted(kernel_s.items()))
        logger.info(
            f"Step {self.step} profiled: collectives {dict(sorted(counts.items()))}"
            + (f"; kernels {kernels}" if kernels else "")
        )

    def _record_state_bytes(self) -> None:
        """Log and save (<dump_folder>/rank_stats/rank<R>.json) the bytes this rank holds
        for parameters, gradients and optimizer states, each storage counted once."""
        params = [p for part in self.model_parts for p in part.parameters()]
        optimizer_states = [
            value
            for optimizer in self.optimizers.optimizers
            for state in optimizer.state.values()
            for value in state.values()
            if isinstance(value, torch.Tensor) and value.dim() > 0
        ]
        self._state_bytes = {
            "parameters": storage_bytes(params),
            "gradients": storage_bytes(p.grad for p in params if p.grad is not None),
            "optimizer_states": storage_bytes(optimizer_states),
        }
        mib = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in self._state_bytes.items())
        logger.info(f"State on this rank: {mib}")
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        folder = os.path.join(self.config.dump_folder, "rank_stats")
        os.makedirs(folder, exist_ok=True)
        write_whole(os.path.join(folder, f"rank{rank}.json"), json.dumps(self._state_bytes))

    def _dump_gradients(self) -> None:
        # full_tensor() gathers sharded gradients: every rank must take part. Alias names
        # of one parameter share its gathered gradient (gathered once).
        grads = {}
        gathered: dict[int, torch.Tensor | None] = {}
        for part in self.model_parts:
            for fqn, param in part.named_parameters(remove_duplicate=False):
                if id(param) not in gathered:
                    grad = param.grad
                    if isinstance(grad, DTensor):
                        grad = grad.full_tensor()
                    gathered[id(param)] = None if grad is None else grad.detach().cpu()
                grads[fqn] = gathered[id(param)]
        if self.parallel_dims.pp_enabled:
            # Each pipeline rank holds its stages' parameters: rank 0 writes them all.
            pp_group = self.parallel_dims.get_mesh("pp").get_group()
            parts: list[dict | None] = [None] * pp_group.size()
            torch.distributed.all_gather_object(parts, grads, group=pp_group)
            grads = {fqn: grad for part in parts for fqn, grad in part.items()}
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            folder = os.path.join(self.config.dump_folder, "grads")
            os.makedirs(folder, exist_ok=True)
            with written_whole(os.path.join(folder, f"step-{self.step}.pt")) as tmp:
                torch.save(grads, tmp)
            logger.info(f"Saved step-{self.step} gradients of {len(grads)} parameters to {folder}")


class AutoParallelTrainer(Trainer):
    """Trainer whose model is parallelized by ``AliasAwareAutoParallel``."""

    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        autoparallel: AliasAwareAutoParallel.Config = field(
            default_factory=AliasAwareAutoParallel.Config
        )

        parallelize: Literal["autoparallel", "torchtitan"] = "autoparallel"
        """Who parallelizes the model: AutoParallel (this project), or the model's own
        torchtitan parallelize function (FSDP/TP by hand), for baselines and parity checks
        on the very same config, data and weights."""

        def __post_init__(self):
            TitanTrainer.Config.__post_init__(self)
            if isinstance(self.loss, ChunkedLossWrapper.Config):
                raise ValueError(
                    "AutoParallel traces lm_head into the model graph, so the chunked loss "
                    "(which applies lm_head itself) cannot be used: use CrossEntropyLoss"
                )

        def build(self, **kwargs):
            # Wire the component in as the model's parallelize_fn. The component checks
            # that AutoParallel is installed, so a missing engine fails here, before any
            # process group or model exists.
            assert self.model_spec is not None, "model_spec must be set before build()"
            config = self
            if self.parallelize == "autoparallel":
                component = self.autoparallel.build()
                model_spec = dataclasses.replace(self.model_spec, parallelize_fn=component)
                config = dataclasses.replace(self, model_spec=model_spec)
            return Configurable.Config.build(config, **kwargs)

    def __init__(self, config: Config):
        self.tied_stages: TiedStages | None = None
        """Tied embeddings split by pipeline stages: this rank's copy and its tie group."""
        tied_across_stages = (
            config.parallelize == "autoparallel"
            and config.parallelism.pipeline_parallel_degree > 1
            and getattr(config.model_spec.model, "enable_weight_tying", False)
        )
        with (
            patches.tied_embeddings_with_pipeline()
            if tied_across_stages
            else contextlib.nullcontext()
        ):
            super().__init__(config)
        if tied_across_stages:
            self.tied_stages = TiedStages.of(
                self.model_parts, pp_mesh=self.parallel_dims.get_mesh("pp")
            )
            if self.tied_stages is not None:
                self.tied_stages.sync_values()
                self.tied_stages.name_optimizer_state_as_eager(self.optimizers)
                self._check_tied_stages(when="after init")

    def train_step(self, data_iterator):
        super().train_step(data_iterator)
        if self.tied_stages is not None:
            self._check_tied_stages(when=f"after step {self.step}")

    def _check_tied_stages(self, *, when: str) -> None:
        """The two stages' copies of the tie hold the same bits (--autoparallel.alias_check)."""
        check = self.config.autoparallel.alias_check
        if check == "off" or not self.tied_stages.differs():
            return
        message = (
            f"tied {FIRST} (first pipeline stage) and {LAST} (last stage) differ {when}: the "
            "copies of one tensor were not kept equal"
        )
        if check == "error":
            raise AliasError(message)
        logger.warning(f"AutoParallel: alias check: {message}")

    def _clip_grad_norm(self, clip, parameters, *args, **kwargs) -> torch.Tensor:
        # The tied gradient is summed before it is dumped or clipped.
        if self.tied_stages is not None:
            self.tied_stages.sum_gradients()
            clip = functools.partial(self.tied_stages.clip, clip)
        return super()._clip_grad_norm(clip, parameters, *args, **kwargs)
