"""CPU support: real torchtitan training on CPU with gloo, on 1 or more ranks.

torchtitan 0.3.0 assumes an accelerator. Every adaptation that makes it run on a machine
without one lives here, each with the limitation it answers. Nothing here runs when an
accelerator is present, unless ``TORCHTITAN_EXT_DEVICE=cpu`` forces it.

Entry points:
- ``adapt_config(config)``: config-level changes, applied by our config functions so they
  show in ``--debug.print_config`` and stay overridable from the command line.
- ``install_runtime()``: process-level patches of torchtitan, applied by our Trainer before
  torchtitan's Trainer picks its device. Idempotent; logged once.
- ``skip_interpreter_teardown_after_success()``: from our Trainer's ``close()`` after a
  successful run, against gloo's abort at interpreter exit.
- ``install_autoparallel_runtime()`` and ``install_compile_runtime()``: AutoParallel's and
  Inductor's CPU gaps, from the AutoParallel component.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import platform
import resource
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torchtitan.models.common.moe import GroupedExperts
from torchtitan.tools.logging import logger

from torchtitan_ext.moe import grouped_experts

_runtime_installed = False
_autoparallel_installed = False
_compile_installed = False


def use_cpu() -> bool:
    """True when training must run on CPU: no accelerator, or TORCHTITAN_EXT_DEVICE=cpu."""
    forced = os.environ.get("TORCHTITAN_EXT_DEVICE", "auto")
    if forced not in ("auto", "cpu"):
        raise ValueError(f"TORCHTITAN_EXT_DEVICE must be 'auto' or 'cpu', got {forced!r}")
    return forced == "cpu" or not torch.accelerator.is_available()


def adapt_config(config) -> None:
    """Make a ``Trainer.Config`` train on CPU. No-op when an accelerator is present."""
    if not use_cpu():
        return
    from torchtitan_ext.models import use_sdpa_attention

    # bf16 matmuls are ~20x slower than float32 on CPUs without AMX, so compute in float32.
    config.training.mixed_precision_param = "float32"
    config.training.mixed_precision_reduce = "float32"
    # CUDA graphs are NVIDIA-only; torchtitan would warn and fall back on every run.
    config.training.disable_cuda_graphs = True
    # FlexAttention has no CPU backward kernel: use SDPA (causal) instead.
    if config.model_spec is not None:
        use_sdpa_attention(config.model_spec.model)
    # GroupedExperts (MoE) casts its inputs and weights to bf16 whatever the training dtype;
    # on CPU compute the experts in float32, as everything else.
    if config.model_spec is not None:
        use_float32_grouped_experts(config.model_spec.model)
    # gloo rejects FSDP's PREMUL_SUM reduce-scatter; torchtitan's own FSDP path needs plain
    # SUM (then divide). AutoParallel's plans use sum/avg only and need nothing here.
    if config.model_spec is not None:
        config.model_spec.parallelize_fn = _with_sum_reduction(config.model_spec.parallelize_fn)


class Float32GroupedExperts(GroupedExperts):
    """torchtitan's GroupedExperts computing in its input's dtype instead of bf16.

    torchtitan 0.3.0's GroupedExperts casts tokens and expert weights to bf16 before every
    grouped matmul, so an MoE model never trains in float32 (and its losses cannot be
    compared at 1e-5 between parallelisms). CPU ``torch._grouped_mm`` takes float32. Same
    parameters, names and initialization; only the casts are gone.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(GroupedExperts.Config):
        pass

    def forward(self, x_RD: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        # DTensor weights (torchtitan's EP) become local, as in GroupedExperts.forward.
        w1_EFD, w2_EDF, w3_EFD = (
            w.to_local() if isinstance(w, DTensor) else w
            for w in (self.w1_EFD, self.w2_EDF, self.w3_EFD)
        )
        return grouped_experts(
            x_RD, num_tokens_per_expert_E, w1_EFD, w2_EDF, w3_EFD, compute_dtype=None
        )


def use_float32_grouped_experts(model_config) -> None:
    """Replace every stock GroupedExperts config in a model config tree with
    Float32GroupedExperts', in place. Idempotent; leaves other expert variants alone."""
    from torchtitan_ext.models import config_values, replace_configs

    def replace(config):
        if type(config) is not GroupedExperts.Config:
            return config
        return Float32GroupedExperts.Config(**config_values(config))

    replace_configs(model_config, GroupedExperts.Config, replace)


def _with_sum_reduction(parallelize_fn):
    if getattr(parallelize_fn, "_forces_sum_reduction", False):
        return parallelize_fn

    @functools.wraps(parallelize_fn)
    def parallelize(model, **kwargs):
        from torch.distributed.fsdp import FSDPModule

        model = parallelize_fn(model, **kwargs)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)
        return model

    parallelize._forces_sum_reduction = True
    return parallelize


class CPUMemoryMonitor:
    """torchtitan's DeviceMemoryMonitor for CPU: torch.cpu has no memory_stats,
    reset_peak_memory_stats or get_device_properties, so report this process's RSS.
    The peak is the kernel's high-water mark (VmHWM), reset through /proc/self/clear_refs.
    """

    def __init__(self) -> None:
        from torchtitan.components.metrics import DeviceMemStats

        self._stats_type = DeviceMemStats
        self.device = torch.device("cpu")
        self.device_name = platform.processor() or platform.machine() or "CPU"
        self.device_capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        self.device_capacity_gib = self.device_capacity / 2**30
        self.reset_peak_stats()

    @staticmethod
    def _peak_rss_bytes() -> int:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def get_peak_stats(self):
        peak = self._peak_rss_bytes()
        gib, pct = peak / 2**30, 100 * peak / self.device_capacity
        return self._stats_type(gib, pct, gib, pct, 0, 0)

    def reset_peak_stats(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # 5 resets the peak RSS (Linux >= 4.0)
        except OSError:
            pass  # not Linux: the peak then covers the whole process lifetime


def _build_cpu_memory_monitor() -> CPUMemoryMonitor:
    monitor = CPUMemoryMonitor()
    logger.info(
        f"CPU capacity: {monitor.device_name} with {monitor.device_capacity_gib:.2f}GiB "
        "memory (memory figures are this process's peak RSS)"
    )
    return monitor


def _set_pg_timeouts_cpu(timeout: timedelta, parallel_dims) -> None:
    # torchtitan's version passes torch.cpu.current_device() (the string "cpu") as a
    # barrier device id, which gloo rejects; the rest is the same.
    logger.info(f"Synchronizing and adjusting timeout for all ProcessGroups to {timeout}")
    dist.barrier()
    groups = [m.get_group() for m in parallel_dims.get_all_one_dimensional_meshes().values()]
    for group in [*groups, None]:
        dist.set_timeout(timeout, group)


def install_runtime() -> None:
    """Patch torchtitan's process-level device assumptions for CPU. No-op with an accelerator."""
    global _runtime_installed
    if _runtime_installed or not use_cpu():
        return
    import torchtitan.components.metrics as metrics
    import torchtitan.distributed.utils as dist_utils
    import torchtitan.tools.utils as tt_utils

    # torchtitan picks its device at import: `_get_available_device_type() or "cuda"`.
    # Several modules copied that binding at import time; rebind every copy.
    for name, module in list(sys.modules.items()):
        if not name.startswith("torchtitan") or module is None:
            continue
        if getattr(module, "device_type", None) == "cuda":
            module.device_type = "cpu"
        if getattr(module, "device_module", None) is torch.cuda:
            module.device_module = torch.cpu
    assert tt_utils.device_type == "cpu"
    metrics.build_device_memory_monitor = _build_cpu_memory_monitor
    dist_utils.set_pg_timeouts = _set_pg_timeouts_cpu
    _allow_float32_grouped_mm_in_tracing()
    _runtime_installed = True
    logger.info(
        "torchtitan_ext CPU support: no accelerator, training on CPU with gloo "
        "(float32, SDPA attention, float32 grouped experts, FSDP sum reduction, "
        "RSS memory stats)"
    )


def _allow_float32_grouped_mm_in_tracing() -> None:
    # torch 2.14's meta kernel of aten._grouped_mm copies the CUDA kernel's checks and refuses
    # float32 ("Expected mat_a to be BFloat16"), while the CPU kernel computes float32. Fake
    # tensors (AutoParallel's tracing, torch.compile) then fail on Float32GroupedExperts.
    # Give unscaled float32 grouped matmuls the meta kernel's own output allocation; the
    # CPU kernel still checks shapes and offsets when it runs.
    import torch._meta_registrations as meta_registrations

    checked_common = meta_registrations._meta_grouped_mm_common

    def meta_grouped_mm_common(
        mat_a,
        mat_b,
        scale_a,
        scale_b,
        offs=None,
        bias=None,
        scale_result=None,
        out_dtype=None,
        use_fast_accum=False,
    ):
        if scale_a is None and mat_a.dtype == mat_b.dtype == torch.float32:
            torch._check(bias is None, lambda: "grouped_mm: bias is not supported")
            torch._check(
                out_dtype in (None, torch.float32),
                lambda: f"grouped_mm: float32 inputs give float32, not {out_dtype}",
            )
            return meta_registrations._create_grouped_mm_output_tensor(
                mat_a, mat_b, offs, torch.float32
            )
        return checked_common(
            mat_a, mat_b, scale_a, scale_b, offs, bias, scale_result, out_dtype, use_fast_accum
        )

    meta_registrations._meta_grouped_mm_common = meta_grouped_mm_common


def skip_interpreter_teardown_after_success() -> None:
    """End a training process that finished cleanly with ``os._exit(0)`` at exit, skipping
    the interpreter's finalization. Call at the end of a successful run, on CPU.

    gloo on CPU: after every step ran and ``destroy_process_group()`` returned, a 2-rank run
    sometimes still aborts during finalization ("terminate called without an active
    exception", exit code -6; here once in a test-suite run, in none of 18 runs in a row).
    gloo's worker threads release tensors holding Python references while the interpreter
    tears down, and a thread that asks for the GIL then is killed inside C++
    (pytorch/pytorch#179291, abandoned upstream). Nothing is left to do by then, so the
    process ends before that. Only in a training entry point (never in a process that
    merely built a Trainer, such as pytest), and never after an uncaught exception, which
    keeps its exit code.
    """
    main = getattr(sys.modules.get("__main__"), "__spec__", None)
    if (
        not use_cpu()
        or main is None
        or main.name not in ("torchtitan.train", "torchtitan_ext.train")
    ):
        return

    def exit_now() -> None:
        if getattr(sys, "last_value", None) is not None:  # an uncaught exception: exit 1
            return
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    atexit.register(exit_now)


def install_autoparallel_runtime() -> None:
    """Close the gaps that keep AutoParallel (a54c252) from planning and running on CPU.

    Idempotent; no-op with an accelerator. Called by the AutoParallel component before it
    traces. Each gap was measured on torch 2.14.1 (see the README's CPU section).
    """
    global _autoparallel_installed
    if _autoparallel_installed or not use_cpu():
        return
    import autoparallel.cost_models.compute_estimation as compute_estimation
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._ops._view_ops import Broadcast, _ViewShardingPropagator

    # Gap 1: the compute cost model finds its device limits by the CUDA device name and
    # raises on CPU. AutoParallel's own CPU tests (tests/conftest.py) answer with the H100
    # entry; we do the same, so plans are costed as for an H100 (relative op costs only).
    h100 = next(lim for lim in compute_estimation.DEVICE_LIMITS if lim.name == "H100")
    compute_estimation._get_device_limit = lambda: h100

    # Gap 2 (1-rank meshes only): DTensor's view-op rewrite maps each input dim to its output
    # dims but has no entry for the singleton dim of aten.expand (a Broadcast), so a Shard on
    # that size-1 dim (legal only when the mesh dim has size 1) raises KeyError. Treat a
    # Broadcast like a Repeat: its input dim is not shardable through the view.
    original_analyze_dim = _ViewShardingPropagator._analyze_dim

    def analyze_dim(self, cmd):
        if isinstance(cmd, Broadcast):
            for d in original_analyze_dim(self, cmd.dim):
                self.shard_allowed[d.input_dim] = [False] * self.mesh_ndim
            return []
        return original_analyze_dim(self, cmd)

    _ViewShardingPropagator._analyze_dim = analyze_dim

    # Gap 2b (1-rank meshes only): a strict view (aten.view) that reshapes a dim sharded on a
    # size-1 mesh dim raises ("would remove or reshape sharded dimension") instead of
    # falling back, and the solver's enumeration stops there (DeepSeek-V3's attention on 1
    # rank). On a 1-rank mesh dim a Shard holds the whole tensor, so the fallback to
    # Replicate is exact: allow it for those mesh dims.
    original_analyze = _ViewShardingPropagator.analyze

    def analyze(self):
        for mesh_dim, placement in enumerate(self.input_src_placements):
            if self.mesh_sizes[mesh_dim] == 1 and isinstance(placement, Shard):
                self.strict_replicate_fallback.add((placement.dim, mesh_dim))
        return original_analyze(self)

    _ViewShardingPropagator.analyze = analyze

    # Gap 3: DTensor has sharding strategies for the CUDA SDPA kernels but none for the CPU
    # flash kernel, so the solver could only replicate attention (the full batch on every
    # rank). Register the same batch- and head-sharded strategies the CUDA flash op has.
    _register_cpu_flash_attention_strategies()

    _autoparallel_installed = True
    logger.info(
        "torchtitan_ext CPU support for AutoParallel: H100 cost-model limits, 1-rank "
        "broadcast views, sharded CPU flash attention"
    )


def _register_cpu_flash_attention_strategies() -> None:
    from torch.distributed.tensor._ops.single_dim_strategy import (
        _ShardingPlaceholder,
        register_single_dim_strategy,
    )

    aten = torch.ops.aten

    @register_single_dim_strategy(aten._scaled_dot_product_flash_attention_for_cpu.default)
    def flash_cpu_strategy(op, args_schema, kwargs_schema):
        if kwargs_schema.get("attn_mask") is not None:
            return []  # a mask would need its own placement; replicate (always offered)
        # [output, logsumexp, query, key, value]: shard batch (dim 0) or heads (dim 1).
        return [[_ShardingPlaceholder(dim)] * 5 for dim in (0, 1)]

    @register_single_dim_strategy(aten._scaled_dot_product_flash_attention_for_cpu_backward.default)
    def flash_cpu_backward_strategy(op, args_schema, kwargs_schema):
        if kwargs_schema.get("attn_mask") is not None:
            return []
        # [grad_q, grad_k, grad_v, grad_out, q, k, v, out, logsumexp].
        return [[_ShardingPlaceholder(dim)] * 9 for dim in (0, 1)]


def agree_across_ranks(value: float, *, device: str = "cpu") -> float:
    """The lowest of every rank's ``value`` (the default process group; a fake one keeps it),
    where every rank must decide alike: whether the graph cache serves this start, and the
    memory bandwidth the overlap scheduler estimates from. ``device``: one the default
    group's backend takes (an accelerator's under NCCL alone).

    The overlap scheduler buckets and orders collectives by runtime estimates made from the
    memory bandwidth, and each rank measures its own: ranks that measured differently issued
    different all-reduce buckets (DDP-like eager, 2 CPU ranks: gloo "Received data size
    doesn't match expected size. 743256 vs 699564", then abort, in 2 of 3 starts). Every
    rank must schedule the same collectives, so they schedule from one figure."""
    dist = torch.distributed
    if not dist.is_initialized() or dist.get_world_size() == 1 or dist.get_backend() == "fake":
        return value
    agreed = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    return agreed.item()


# What one process's tensor copy can reach on a CPU; a figure outside it was not measured
# on real memory (a copy under a fake-tensor mode "runs" at thousands of GB/s).
PLAUSIBLE_CPU_BANDWIDTH_GBS = (0.5, 1000.0)


def measure_memory_bandwidth_gbs(*, nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """This process's memory bandwidth in GB/s: the best of a few large tensor copies,
    counting the bytes read and written, on real tensors whatever dispatch modes (the fake
    and proxy modes AutoParallel applies under) are active. RuntimeError outside
    PLAUSIBLE_CPU_BANDWIDTH_GBS."""
    import time

    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        src = torch.ones(nbytes // 4, dtype=torch.float32)
        dst = torch.empty_like(src)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t0)
    bandwidth = 2 * nbytes / best / 1e9
    low, high = PLAUSIBLE_CPU_BANDWIDTH_GBS
    if not low <= bandwidth <= high:
        raise RuntimeError(
            f"measured memory bandwidth {bandwidth:.1f} GB/s is outside [{low}, {high}] GB/s, "
            "implausible for a CPU: the copies did not run on real memory"
        )
    return bandwidth


def install_compile_runtime() -> None:
    """Let Inductor's comm/compute overlap scheduler (used by AutoParallel's compile
    backend for bucketing and overlap) run on CPU. Idempotent; no-op with an accelerator.

    The scheduler estimates op runtimes from the device's DRAM bandwidth, which Inductor
    reads from a GPU datasheet or asks triton for (failing on CPU: "0 active drivers"); we
    give it this machine's bandwidth, measured once. It also benchmarks nodes with
    torch.cuda.synchronize unless the compute estimator is "analytical" (roofline).
    """
    global _compile_installed
    if _compile_installed or not use_cpu():
        return
    from torch._inductor import config as inductor_config
    from torch._inductor.analysis import device_info

    bandwidth = agree_across_ranks(measure_memory_bandwidth_gbs())
    datasheet_dram_bw_gbs = device_info.datasheet_dram_bw_gbs

    def dram_bw_gbs(device_name: str | None = None) -> float | None:
        return bandwidth if device_name is None else datasheet_dram_bw_gbs(device_name)

    device_info.datasheet_dram_bw_gbs = dram_bw_gbs
    inductor_config.aten_distributed_optimizations.compute_estimator = "analytical"
    _compile_installed = True
    logger.info(
        f"torchtitan_ext CPU support for compile: memory bandwidth measured at "
        f"{bandwidth:.1f} GB/s for Inductor's overlap scheduler; analytical compute estimates"
    )
