"""Every adaptation of torch, torchtitan and AutoParallel this project makes, in one place.
Each says which limitation it answers and when it can go; nothing here runs until called.

Called by the AutoParallel component (any device):
- ``adapt_local_map_hop``: the expert region's local_map (HOP naming, in_grad_placements)
- ``memoized_redistribute_costs``: AutoParallel's strategy tables, built in a fraction
- ``memoized_optimizer_input_nodes``: the ILP's variables, built without re-reading inputs
- ``strategies_only_optimizer``: no ILP on a rank that does not solve
- ``optimizer_outside_gc``: the ILP built and solved without the garbage collector's passes
- ``memoized_sympy_factor``: size hints of unbacked expressions, factored once
- ``reset_autoparallel_caches``: AutoParallel's caches keyed without the mesh
- ``grouped_mm_inputs_keep_eager_strides``: Inductor's _grouped_mm input strides
- ``serializable_compile``: AutoParallel's apply compiling in AOTAutograd's serializable form
- ``recording_overlap_schedule``: the graphs Inductor's overlap scheduler bucketed
Called by torchtitan_ext.cpu.install_runtime (CPU only):
- ``torchtitan_on_cpu``: torchtitan's device globals, memory monitor, process-group timeouts
- ``float32_grouped_mm_meta``: the meta kernel of float32 _grouped_mm
- ``autoparallel_on_cpu``: AutoParallel's cost model and DTensor strategies on CPU
- ``inductor_overlap_on_cpu``: Inductor's overlap scheduler without a GPU
- ``SumReductionParallelize``: torchtitan's FSDP on gloo
Called by the Trainer: ``clip_grad_norm_seam`` (torchtitan's seam between backward and
clipping), ``tied_embeddings_with_pipeline`` (torchtitan's refusal of tied embeddings with
pipeline parallelism). Not here: torchtitan_ext.train's main() sets
torchtitan.train.ConfigManager, the hook torchtitan's entry point builds its config through.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta

import torch
import torch.distributed as dist
from torchtitan.tools.logging import logger

# The forward region's kwargs key for the gradient placements (adapt_local_map_hop), and
# torch's autograd kernel of the HOP that the adaptation wraps.
_GRAD_PLACEMENTS = "torchtitan_ext_in_grad_placements"
_torch_autograd_kernel = None


def adapt_local_map_hop() -> None:
    """What the expert region needs of torch 2.14's local_map HOP (the form AutoParallel
    a54c252 traces local_map into) that it lacks; idempotent.

    1. AutoParallel recognizes a local_map node by "call_local_map" in str(target) (torch's
       earlier local_map function); LocalMapHOP's str is the default object repr, so the
       solver asserts. The HOP is named as AutoParallel reads it. Goes when AutoParallel
       matches the HOP by type.
    2. ``in_grad_placements``: the HOP's autograd rejects them ("not yet supported") and
       gives the backward region the forward's ``in_placements`` as the placements of the
       gradients it returns; AutoParallel asserts they are None. So an input replicated on
       an axis whose ranks compute different partial gradients (the expert weights on
       efsdp) gets a gradient declared complete, and the plan never sums it: wrong
       gradients, silently (meta-pytorch/autoparallel#515). Here the gradients are
       declared as given: the forward region's kwargs keep them under a private key
       (AutoParallel's assert sees None) and the backward region returns them as its
       ``out_placements``, from which the solver plans the reduction like any Partial.
       Goes when torch's HOP honours in_grad_placements and AutoParallel reads them
       (the approach of meta-pytorch/autoparallel#512, closed unmerged).
    """
    global _torch_autograd_kernel
    from torch._C import DispatchKey
    from torch._higher_order_ops import local_map as hop

    hop.LocalMapHOP.__str__ = lambda self: f"call_local_map[{self.name()}]"
    kernels = hop.local_map_hop.py_kernels
    if kernels[DispatchKey.Autograd] is not _autograd_with_grad_placements:
        _torch_autograd_kernel = kernels[DispatchKey.Autograd]
        kernels[DispatchKey.Autograd] = _autograd_with_grad_placements
        hop.local_map_hop._dispatch_cache.clear()


def _autograd_with_grad_placements(fw_gm, *args, **kwargs):
    """torch's autograd kernel of local_map_hop, with in_grad_placements honoured
    (adapt_local_map_hop, 2.)."""
    from torch._higher_order_ops import local_map as hop

    kw = fw_gm.meta["local_map_kwargs"]
    grads = kw.get(_GRAD_PLACEMENTS) or kw.get("in_grad_placements")
    if grads is None or not hop._DEFER_INLINING:
        return _torch_autograd_kernel(fw_gm, *args, **kwargs)
    fw_gm.meta["local_map_kwargs"] = {**kw, "in_grad_placements": None, _GRAD_PLACEMENTS: grads}
    fw_gm, bw_gm, num_fw_ins, num_fw_outs, filtered_grads_idx = hop.create_hop_fw_bw(fw_gm, *args)
    # None: the gradient placed like its input (local_map's own default).
    bw_gm.meta["local_map_kwargs"]["out_placements"] = tuple(
        placement if grad is None else grad
        for placement, grad in zip(kw["in_placements"], grads, strict=True)
    )
    return hop.LocalMapAutogradOp.apply(
        fw_gm, bw_gm, num_fw_ins, num_fw_outs, filtered_grads_idx, *args, **kwargs
    )


@contextlib.contextmanager
def memoized_redistribute_costs() -> Iterator[None]:
    """Memoize DTensor's redistribute_cost while AutoParallel builds its strategy tables.

    AutoParallel a54c252 costs every (producer strategy, consumer input spec) pair with
    torch's generate_redistribute_costs; the same pairs recur in every layer and strategy,
    so most calls repeat an earlier one (benchmarks/scaling.py measures the phases). The
    cost is a function of the two specs alone (mesh,
    placements, shard order, shape, stride and dtype: what DTensorSpec hashes and
    compares), so each pair is computed once. Specs that do not hash (symbolic shapes)
    are costed as before. Goes when torch or AutoParallel caches these costs.
    """
    from torch.distributed.tensor._ops import utils

    cost = utils.redistribute_cost
    memo: dict = {}

    def memoized(current_spec, target_spec) -> float:
        try:
            key = (current_spec, target_spec)
            if key not in memo:
                memo[key] = cost(current_spec, target_spec)
            return memo[key]
        except TypeError:
            return cost(current_spec, target_spec)

    utils.redistribute_cost = memoized
    try:
        yield
    finally:
        utils.redistribute_cost = cost


@contextlib.contextmanager
def memoized_optimizer_input_nodes() -> Iterator[None]:
    """Memoize ShardingOptimizer._all_input_nodes per optimizer and node.

    AutoParallel a54c252 asks for a node's tensor inputs (a pytree flatten of its args,
    filtered by the strategy table) once per ILP variable: ~500k times for the 2-layer
    Qwen3 30B-A3B on 64 ranks (EP 8), about a fifth of the optimizer's construction. The
    answer depends only on the node's args and on which nodes have strategies, neither of
    which changes once the optimizer's strategy table is built (every caller reads it
    after). Goes when AutoParallel computes the inputs once per node.
    """
    from autoparallel.optimize_sharding import ShardingOptimizer

    input_nodes = ShardingOptimizer._all_input_nodes

    def memoized(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        memo = self.__dict__.setdefault("_torchtitan_ext_input_nodes", {})
        if node not in memo:
            memo[node] = input_nodes(self, node)
        return memo[node]

    ShardingOptimizer._all_input_nodes = memoized
    try:
        yield
    finally:
        ShardingOptimizer._all_input_nodes = input_nodes


@contextlib.contextmanager
def strategies_only_optimizer(enabled: bool) -> Iterator[None]:
    """With ``enabled`` (a rank that does not solve: it receives the solving rank's
    placements, or loads a placement file), AutoParallel builds its ShardingOptimizer's
    strategy table, which placements are matched against, and not the ILP over it.

    AutoParallel a54c252 builds the ILP (a decision variable per strategy pair with its
    communication and compute cost, and the default constraints) in the optimizer's
    constructor, on every rank, though only a solve reads it: two thirds of the
    construction for the 2-layer Qwen3 30B-A3B on 64 ranks (EP 8). Such a rank adds no
    constraint and does not solve; anything that would read the ILP fails on the missing
    attribute. Goes when AutoParallel builds the ILP at the first constraint or solve.
    """
    if not enabled:
        yield
        return
    from autoparallel import api
    from autoparallel.optimize_sharding import ShardingOptimizer, concretize_gm

    class StrategiesOnly(ShardingOptimizer):
        # The constructor's first part (a54c252): the concrete graph and strategy table.
        def __init__(self, gm, mesh, *args, **kwargs):
            self.orig_gm = gm
            self.gm, self._orig_to_concrete, self._concrete_to_orig = concretize_gm(gm)
            self.graph = self.gm.graph
            self.mesh = mesh
            self.strats = self.build_sharding_metadata()
            self.nodes = list(self.strats)
            self.node_map = {node: i for i, node in enumerate(self.nodes)}

    api.ShardingOptimizer = StrategiesOnly
    try:
        yield
    finally:
        api.ShardingOptimizer = ShardingOptimizer


@contextlib.contextmanager
def optimizer_outside_gc() -> Iterator[None]:
    """Build and solve AutoParallel's ILP with Python's cyclic garbage collector paused, and
    keep what they built out of its later passes until the plan is done.

    AutoParallel a54c252's ShardingOptimizer allocates millions of long-lived objects (a
    PuLP variable, a decision variable and cost terms per ILP variable: 782k roots and 1M
    cluster links for 4 Qwen3 30B-A3B layers on 64 ranks, EP 8), and every full collection
    walks all of them again: 14 s of collector time in a 135 s 4-layer plan, 6 s of it
    while the decision variables are built. These objects hold no reference cycles that
    need collecting before the plan ends, so the collector is paused while the optimizer
    is built and solved, and the objects alive after each are frozen (gc.freeze: skipped
    by later passes, such as apply's) until the context exits, when they are unfrozen and
    collected as usual. Goes when AutoParallel's ILP is built from flat arrays instead of
    per-variable Python objects.
    """
    import gc

    from autoparallel.optimize_sharding import ShardingOptimizer

    init, get_solution = ShardingOptimizer.__init__, ShardingOptimizer.get_solution

    def paused(method: Callable) -> Callable:
        @functools.wraps(method)
        def run(*args, **kwargs):
            enabled = gc.isenabled()
            gc.disable()
            try:
                return method(*args, **kwargs)
            finally:
                gc.freeze()
                if enabled:
                    gc.enable()

        return run

    ShardingOptimizer.__init__ = paused(init)
    ShardingOptimizer.get_solution = paused(get_solution)
    try:
        yield
    finally:
        ShardingOptimizer.__init__, ShardingOptimizer.get_solution = init, get_solution
        gc.unfreeze()


@contextlib.contextmanager
def memoized_sympy_factor() -> Iterator[None]:
    """Memoize sympy.factor while AutoParallel traces, solves and applies.

    torch 2.14's optimization_hint (size hints of expressions with unbacked symbols: the
    tokens each rank's experts receive) factors the expression with sympy each time, ~5
    ms a call; local_map's partitioner and Inductor's overlap scheduler ask again and
    again for the same few expressions (411 calls, 27 distinct, for 2 Qwen3 30B-A3B MoE
    layers on 64 ranks). sympy expressions are immutable and factor is a pure function of
    them, so each is factored once. Goes when torch caches optimization hints.
    """
    import sympy

    factor = sympy.factor
    memo: dict = {}

    def memoized(expr, *gens, **args):
        try:
            key = (expr, gens, tuple(sorted(args.items())))
            if key not in memo:
                memo[key] = factor(expr, *gens, **args)
            return memo[key]
        except TypeError:
            return factor(expr, *gens, **args)

    sympy.factor = memoized
    try:
        yield
    finally:
        sympy.factor = factor


def reset_autoparallel_caches() -> None:
    """Clear AutoParallel's strategy and cost caches before each plan. They are keyed
    without the mesh, so a second plan in one process for a mesh of another size would
    reuse stale strategies and get an infeasible ILP. Goes when AutoParallel keys them
    with the mesh."""
    from autoparallel.cost_models.collective_runtime_estimation import reset_comms_cost_cache
    from autoparallel.cost_models.compute_estimation import reset_compute_cost_cache
    from autoparallel.shardings.placement_options import reset_placement_options_cache

    reset_placement_options_cache()
    reset_comms_cost_cache()
    reset_compute_cost_cache()


def grouped_mm_inputs_keep_eager_strides() -> None:
    """Have Inductor hand torch._grouped_mm its inputs in the eager graph's stride order.
    Idempotent; called before compiling (every plan: only graphs with _grouped_mm change).
    Goes when Inductor's _grouped_mm lowering keeps 16-byte-aligned strides.

    torch 2.14's Inductor lowering of _grouped_mm (tuned_grouped_mm, which picks the ATen
    kernel on CPU) realizes its inputs asking only for some dim of stride 1, so it may
    materialize the backward's transposed token matrix as a fresh contiguous (dim, tokens)
    buffer, whose row stride is the number of tokens this rank received. _grouped_mm needs
    strides that are multiples of 16 bytes (CPU and CUDA), and that count depends on the
    routing: compiled EP 2 x efsdp 2 (4 CPU ranks) failed at step 3 with "strides should be
    multiple of 16 bytes". Eager, the same matrix is a transposed view of the (tokens, dim)
    buffer, whose strides are fixed by dim. Inductor's FX graph cache key does not hold
    layout constraints: a graph compiled without this one is served unchanged
    (tests/test_moe_inductor.py turns the cache off).
    """
    from torch._inductor.lowering import add_layout_constraint, constrain_to_fx_strides

    add_layout_constraint(torch.ops.aten._grouped_mm.default, constrain_to_fx_strides)


def torchtitan_on_cpu(*, build_memory_monitor: Callable, peak_flops: Callable[[], float]) -> None:
    """torchtitan 0.3.0 assumes an accelerator: it picks its device at import
    (`_get_available_device_type() or "cuda"`, a binding several modules copied), builds a
    CUDA memory monitor, passes the string "cpu" as a barrier device id, which gloo
    rejects, and computes MFU against a GPU's peak (an A100's for an unknown device, after
    running lspci). Rebind every copy to CPU, use ``build_memory_monitor``, set
    process-group timeouts without that barrier argument, and take MFU's peak from
    ``peak_flops()``. Goes when torchtitan runs on CPU itself."""
    import torchtitan.components.metrics as metrics
    import torchtitan.distributed.utils as dist_utils
    import torchtitan.tools.utils as tt_utils

    for name, module in list(sys.modules.items()):
        if not name.startswith("torchtitan") or module is None:
            continue
        if getattr(module, "device_type", None) == "cuda":
            module.device_type = "cpu"
        if getattr(module, "device_module", None) is torch.cuda:
            module.device_module = torch.cpu
    assert tt_utils.device_type == "cpu"
    metrics.build_device_memory_monitor = build_memory_monitor
    dist_utils.set_pg_timeouts = _set_pg_timeouts_cpu
    measured = functools.cache(peak_flops)  # torchtitan asks once per Trainer and metrics
    tt_utils.get_peak_flops = lambda device_name: measured()


def _set_pg_timeouts_cpu(timeout: timedelta, parallel_dims) -> None:
    # torchtitan's version, without the barrier's device id.
    logger.info(f"Synchronizing and adjusting timeout for all ProcessGroups to {timeout}")
    dist.barrier()
    groups = [m.get_group() for m in parallel_dims.get_all_one_dimensional_meshes().values()]
    for group in [*groups, None]:
        dist.set_timeout(timeout, group)


def float32_grouped_mm_meta() -> None:
    """torch 2.14's meta kernel of aten._grouped_mm copies the CUDA kernel's checks and
    refuses float32 ("Expected mat_a to be BFloat16"), while the CPU kernel computes
    float32: fake tensors (AutoParallel's tracing, torch.compile) then fail on
    Float32GroupedExperts. Unscaled float32 grouped matmuls get the meta kernel's own
    output allocation; the CPU kernel still checks shapes and offsets when it runs. Goes
    when torch's meta kernel accepts float32."""
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


def autoparallel_on_cpu() -> None:
    """Close the gaps that keep AutoParallel (a54c252) from planning and running on CPU
    (measured on torch 2.14.1). Goes gap by gap as AutoParallel and DTensor close them."""
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


def inductor_overlap_on_cpu(*, bandwidth_gbs: Callable[[], float]) -> None:
    """Let Inductor's comm/compute overlap scheduler (AutoParallel's compile backend and our
    eager runner bucket and order collectives with it) run on CPU. It estimates op runtimes
    from the device's DRAM bandwidth, which Inductor reads from a GPU datasheet or asks
    triton for (failing on CPU: "0 active drivers"): it gets ``bandwidth_gbs()``, asked at
    its first use. It also benchmarks nodes with torch.cuda.synchronize unless the compute
    estimator is "analytical" (roofline). Goes when Inductor estimates CPU runtimes."""
    from torch._inductor import config as inductor_config
    from torch._inductor.analysis import device_info

    datasheet_dram_bw_gbs = device_info.datasheet_dram_bw_gbs
    measured = functools.cache(bandwidth_gbs)

    def dram_bw_gbs(device_name: str | None = None) -> float | None:
        return measured() if device_name is None else datasheet_dram_bw_gbs(device_name)

    device_info.datasheet_dram_bw_gbs = dram_bw_gbs
    inductor_config.aten_distributed_optimizations.compute_estimator = "analytical"


class SumReductionParallelize:
    """A torchtitan parallelize function whose FSDP modules reduce with plain SUM: gloo
    rejects FSDP's PREMUL_SUM reduce-scatter (torchtitan's own FSDP path on CPU).
    AutoParallel's plans use sum/avg only and need nothing. Goes when gloo takes
    PREMUL_SUM."""

    def __init__(self, parallelize_fn: Callable):
        self.parallelize_fn = parallelize_fn
        functools.update_wrapper(self, parallelize_fn)

    def __call__(self, model, **kwargs):
        from torch.distributed.fsdp import FSDPModule

        model = self.parallelize_fn(model, **kwargs)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)
        return model


class NotSerializable(RuntimeError):
    """AOTAutograd refused to compile the graphs in its serializable form."""


@contextlib.contextmanager
def serializable_compile(captured: dict):
    """Make AutoParallel's apply_placement compile its graphs in AOTAutograd's serializable
    form and put the serializable callable in ``captured["compiled"]`` (the graph cache).

    AutoParallel a54c252 calls aot_compile_joint_with_descriptors without serializable=True
    and keeps only a closure around the result; we wrap the function it imported. With
    serializable=True AOTAutograd compiles the backward at once (not at the first backward)
    and bundles both graphs with its runtime metadata; the graphs and how they run are
    unchanged. The fw/bw compilers must return an OutputCode: Inductor's compiled graph,
    or our eager runner wrapped by graph_cache_entry.eager_output_code. Goes when
    AutoParallel's API can ask for the serializable form."""
    import autoparallel.api as ap_api

    compile_joint = ap_api.aot_compile_joint_with_descriptors

    def compile_serializable(jd, **kwargs):
        try:
            fn = compile_joint(jd, serializable=True, **kwargs)
        except Exception as e:
            raise NotSerializable(
                f"AOTAutograd could not serialize the graphs ({type(e).__name__}: {e})"
            ) from e
        compiled = fn
        # simple_wraps: the returned function's __wrapped__ is the serializable callable.
        while not hasattr(compiled, "serialize_compile_artifacts"):
            compiled = compiled.__wrapped__
        captured["compiled"] = compiled
        return fn

    ap_api.aot_compile_joint_with_descriptors = compile_serializable
    try:
        yield
    finally:
        ap_api.aot_compile_joint_with_descriptors = compile_joint


@contextlib.contextmanager
def recording_overlap_schedule(record: Callable[[torch.fx.Graph], None]) -> Iterator[None]:
    """Hand every graph Inductor's overlap scheduler bucketed and reordered (in place) to
    ``record``: the plan report counts the collectives Inductor's code issues. Inductor
    imports the pass from its module each time it runs it. Goes when Inductor reports what
    it bucketed."""
    from torch._inductor.fx_passes import overlap_scheduling

    schedule = overlap_scheduling.schedule_overlap_bucketing_from_inductor_configs

    def recording_schedule(graph, *args, **kwargs):
        result = schedule(graph, *args, **kwargs)
        record(graph)
        return result

    overlap_scheduling.schedule_overlap_bucketing_from_inductor_configs = recording_schedule
    try:
        yield
    finally:
        overlap_scheduling.schedule_overlap_bucketing_from_inductor_configs = schedule


@contextlib.contextmanager
def clip_grad_norm_seam(clip: Callable[..., torch.Tensor]) -> Iterator[None]:
    """Have torchtitan's train_step call ``clip(clip_grad_norm_, *args, **kwargs)`` where it
    calls dist_utils.clip_grad_norm_: train_step runs backward, clipping and the optimizer
    step in one method, whose one seam between backward and clipping is that call. Goes when
    torchtitan's Trainer has a hook there."""
    from torchtitan.distributed import utils as dist_utils

    clip_grad_norm = dist_utils.clip_grad_norm_
    dist_utils.clip_grad_norm_ = functools.partial(clip, clip_grad_norm)
    try:
        yield
    finally:
        dist_utils.clip_grad_norm_ = clip_grad_norm


@contextlib.contextmanager
def tied_embeddings_with_pipeline() -> Iterator[None]:
    """Let a config that ties its embeddings pass torchtitan 0.3.0's model-config check
    under pipeline parallelism (Decoder.Config.update_from_config raises
    NotImplementedError: torchtitan's stages would each train their own copy). The
    AutoParallel Trainer keeps the copies one tensor (torchtitan_ext.tied_stages). Goes
    when torchtitan supports weight tying with pipeline parallelism (pytorch/torchtitan
    #1409)."""
    from torchtitan.models.common.decoder import Decoder

    update_from_config = Decoder.Config.update_from_config

    def update_untied(self, *, config, **kwargs) -> None:
        tied = self.enable_weight_tying
        self.enable_weight_tying = False
        try:
            update_from_config(self, config=config, **kwargs)
        finally:
            self.enable_weight_tying = tied

    Decoder.Config.update_from_config = update_untied
    try:
        yield
    finally:
        Decoder.Config.update_from_config = update_from_config
