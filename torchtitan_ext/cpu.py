"""CPU support: real torchtitan training on CPU with gloo, on 1 or more ranks.

torchtitan 0.3.0 assumes an accelerator. Nothing here runs when an accelerator is present,
unless ``TORCHTITAN_EXT_DEVICE=cpu`` forces it. Entered from the entry points only:
- ``adapt_config(config)``: config-level changes, applied by our config functions (and by
  torchtitan_ext.train for torchtitan's own configs) so they show in
  ``--debug.print_config`` and stay overridable from the command line.
- ``install_runtime()``: the process-level adaptations (torchtitan_ext.patches: torchtitan,
  AutoParallel and Inductor on CPU), from our Trainer before torchtitan's picks its device,
  and from the dry run (parallelize.dry_run). Idempotent; logged once.
- ``skip_interpreter_teardown_after_success()``: from our Trainer's ``close()`` after a
  successful run, against gloo's abort at interpreter exit.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import platform
import resource
import sys
import time

import torch
from torchtitan.tools.logging import logger

from torchtitan_ext import patches
from torchtitan_ext.models import use_float32_grouped_experts, use_sdpa_attention
from torchtitan_ext.ranks import agree_across_ranks

_runtime_installed = False


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
    parallelize_fn = config.model_spec.parallelize_fn if config.model_spec is not None else None
    if parallelize_fn is not None and not isinstance(
        parallelize_fn, patches.SumReductionParallelize
    ):
        config.model_spec.parallelize_fn = patches.SumReductionParallelize(parallelize_fn)


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


def install_runtime() -> None:
    """Install the process-level CPU adaptations (torchtitan_ext.patches): torchtitan's
    device, memory monitor and timeouts; float32 grouped matmuls under fake tensors;
    AutoParallel's CPU gaps (when it is installed); Inductor's overlap scheduler, with
    this machine's memory bandwidth agreed across ranks at its first use. No-op with an
    accelerator; idempotent."""
    global _runtime_installed
    if _runtime_installed or not use_cpu():
        return
    patches.torchtitan_on_cpu(
        build_memory_monitor=_build_cpu_memory_monitor, peak_flops=measure_peak_flops
    )
    patches.float32_grouped_mm_meta()
    autoparallel = importlib.util.find_spec("autoparallel") is not None
    if autoparallel:
        patches.autoparallel_on_cpu()
    patches.inductor_overlap_on_cpu(bandwidth_gbs=_agreed_bandwidth_gbs)
    _runtime_installed = True
    logger.info(
        "torchtitan_ext CPU support: no accelerator, training on CPU with gloo "
        "(float32, SDPA attention, float32 grouped experts, FSDP sum reduction, "
        "RSS memory stats, MFU against a measured float32 matmul peak)"
    )
    if autoparallel:
        logger.info(
            "torchtitan_ext CPU support for AutoParallel: H100 cost-model limits, 1-rank "
            "broadcast views, sharded CPU flash attention"
        )


def _agreed_bandwidth_gbs() -> float:
    """Every rank's measured bandwidth, agreed (the lowest): the overlap scheduler buckets
    and orders collectives by runtime estimates made from it, and ranks that measured
    differently issued different all-reduce buckets (DDP-like eager, 2 CPU ranks: gloo
    "Received data size doesn't match expected size", then abort). Asked by each rank at
    the same point, its first graph scheduled."""
    bandwidth = agree_across_ranks(measure_memory_bandwidth_gbs())
    logger.info(
        f"torchtitan_ext CPU support for compile: memory bandwidth measured at "
        f"{bandwidth:.1f} GB/s for Inductor's overlap scheduler; analytical compute estimates"
    )
    return bandwidth


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


# What one process's tensor copy can reach on a CPU; a figure outside it was not measured
# on real memory (a copy under a fake-tensor mode "runs" at thousands of GB/s).
PLAUSIBLE_CPU_BANDWIDTH_GBS = (0.5, 1000.0)


def measure_memory_bandwidth_gbs(*, nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """This process's memory bandwidth in GB/s: the best of a few large tensor copies,
    counting the bytes read and written, on real tensors whatever dispatch modes (the fake
    and proxy modes AutoParallel applies under) are active. RuntimeError outside
    PLAUSIBLE_CPU_BANDWIDTH_GBS."""
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


def measure_peak_flops(*, size: int = 1024, repeats: int = 5) -> float:
    """This process's float32 matmul rate in FLOP/s, the best of a few ``size``-square
    matmuls: MFU's peak on CPU (torchtitan would use an A100's). Ranks measure at once and
    share the cores, so it is what each rank's matmuls can reach while all of them run."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    peak = 2 * size**3 / best
    logger.info(
        f"torchtitan_ext CPU support: MFU against this rank's float32 matmul peak, "
        f"{peak / 1e9:.1f} GFLOP/s (measured)"
    )
    return peak
