"""AliasAwareAutoParallel: torchtitan's ``parallelize_fn``, implemented with Meta's AutoParallel.

The component receives torchtitan's meta-device model and returns the module AutoParallel
built (trace, constraints, ``optimize_placement``, ``apply_placement``), with every alias
name of the original model registered on it, kept tied through ``init_weights`` and
verified. The Trainer then calls ``to_empty()`` and ``init_weights()`` on it as usual.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.distributed.tensor.placement_types import Replicate, Shard
from torchtitan.config import TORCH_DTYPE_MAP, Configurable
from torchtitan.distributed.fsdp import get_fsdp_reshard_after_forward_policy
from torchtitan.models.common.moe import RoutedExperts
from torchtitan.tools.logging import logger

from torchtitan_ext import cpu, graph_cache, patches
from torchtitan_ext.aliases import AliasError, AliasMap, storage_bytes, unique_storage_bytes
from torchtitan_ext.dump_folder import write_whole, written_whole
from torchtitan_ext.moe import (
    EP_DATA_AXES,
    check_expert_gradients,
    enable_expert_parallel,
    expert_gradient_placements,
    grouped_mm_inputs_keep_eager_strides,
)
from torchtitan_ext.plan import PlanReport, build_report, collectives

# The AutoParallel commit this project is tested against; pyproject.toml's extra pins it too.
# For the install message only: keys hold what is installed (graph_cache.autoparallel_version).
AUTOPARALLEL_COMMIT = "a54c2529b1cb10b6b27a585b4a6fc2f84bc1d232"
AUTOPARALLEL_INSTALL = (
    "pip install 'autoparallel @ git+https://github.com/meta-pytorch/autoparallel.git@"
    f"{AUTOPARALLEL_COMMIT}' pulp  (or: pip install -e '.[autoparallel]'). "
    "The PyPI package named 'autoparallel' is an unrelated project."
)

# torchtitan mesh axes AutoParallel plans over, in mesh order. The sharded data axis is
# "fsdp" under the partial_dtensor backend and "dp_shard" under the others; torchtitan keeps
# it even at size 1, so a 1-rank run gets a 1-rank mesh.
_DATA_AXES = ("dp_replicate", "fsdp", "dp_shard", *EP_DATA_AXES)


def require_autoparallel() -> None:
    """Raise ImportError with the install command when Meta's AutoParallel is missing."""
    try:
        from autoparallel.api import AutoParallel  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"Meta's AutoParallel is not installed ({e}). Install it at the pinned commit: "
            f"{AUTOPARALLEL_INSTALL}"
        ) from e


@dataclass(slots=True)
class PhaseTimes:
    """Seconds spent in each start-up phase of the last parallelization."""

    alias_capture: float = 0.0
    trace: float = 0.0
    solve: float = 0.0
    apply: float = 0.0
    alias_restore: float = 0.0
    alias_verify: float = 0.0
    init: float = 0.0
    graph_cache_load: float = 0.0
    """A warm start: reading the graph cache and rebuilding the module (trace, solve and
    apply are then 0)."""
    graph_cache_save: float = 0.0
    compile: float = 0.0
    """--compile.enable: Inductor compiling the forward and backward (during apply; not
    counted in apply)."""


@dataclass(slots=True)
class PlanSpec:
    """What one parallelization plans for; built from torchtitan's arguments."""

    axes: list[str]
    mesh: object  # DeviceMesh with these axes
    batch: int
    """Global batch (rows) of one microbatch."""
    input_fn: object
    mp_policy: object
    reshard_after_forward: bool
    input_placement: tuple
    logits_placement: tuple
    memory_bounds: tuple[float, float]
    placement_path: str
    key: dict
    """plan_key(): what a placement file must have been solved for."""


class AliasAwareAutoParallel(Configurable):
    """Parallelize a torchtitan model with AutoParallel, keeping every alias intact."""

    @dataclass(kw_only=True, slots=True)
    class Config(Configurable.Config):
        param_memory_low: float | None = None
        """Lower bound on the parameter memory each rank holds, as a fraction of all
        parameters (1.0 = fully replicated). Unset: 0 on a sharded (fsdp) mesh, 1.0 on a
        replicate-only (data_parallel_replicate_degree) mesh."""

        param_memory_high: float | None = None
        """Upper bound on the parameter memory each rank holds, as a fraction of all
        parameters. Unset: 1/(dp_shard * tp) when parameters may be sharded (FSDP-like),
        1.0 on a replicate-only mesh (DDP-like)."""

        alias_check: Literal["error", "warn", "off"] = "error"
        """What to do when the parallel model's aliases do not match the original model's
        (a name missing, a group split into separate tensors, a buffer's persistence
        changed), checked after parallelization and again after init_weights."""

        placement_file: str = ""
        """JSON file holding the solver's placements. If it exists, it is loaded and the
        solve is skipped; otherwise the solution is saved there. Empty: always solve.
        Relative paths are under dump_folder."""

        parallel_matmuls: bool = True
        """Require every forward matmul to compute only this rank's share: its rows of the
        batch on the data-parallel axes and, with tensor_parallel_degree > 1, its slice of
        the weight on tp (column-parallel, or row-parallel with partial sums; the solver
        picks). Without it, the solver's cost model (H100 figures, also on CPU) often
        prefers replicating compute (the whole batch, or the whole weight) over the
        collectives that splitting it needs."""

        compile_cache_dir: str = "compile_cache"
        """With --compile.enable: Inductor's cache folder, whose C++ kernels a second start
        (from the graph cache, or compiling again) loads instead of building. Relative
        paths are under dump_folder; empty keeps Inductor's default
        (TORCHINDUCTOR_CACHE_DIR)."""

        all_reduce_bucket_mb: float = 4.0
        """Compiled, and eager with eager_overlap: merge adjacent independent all-reduces
        (the gradients of a DDP-like or HSDP plan) into buckets of at most this many MB,
        issued as their gradients are ready. 0: one all-reduce per gradient, as planned."""

        eager_overlap: bool = True
        """Without --compile.enable: bucket the plan's all-gathers and reduce-scatters and
        move them to overlap compute (Inductor's FX overlap scheduler, run on the eager
        graphs without code generation); gradient all-reduces are bucketed by
        all_reduce_bucket_mb. False: one collective per parameter, where the plan puts it."""

        graph_cache_dir: str = "graph_cache"
        """Plans without expert parallelism: folder of the graph cache
        (torchtitan_ext/graph_cache.py). A start whose model, mesh, batch, dtypes,
        constraints, compile settings, placement file and versions equal a cached start's
        rebuilds the parallel model from it and skips tracing, solving, applying and
        (compiled) Inductor. Relative paths are under dump_folder; empty: no cache."""

        dump_placements: bool = False
        """Write the solver's placements (placements.json, the placement_file format; and
        solution.txt, one line per graph node) to <dump_folder>/autoparallel/ on rank 0.
        The plan report is always written there as plan.json."""

    def __init__(self, config: Config):
        require_autoparallel()
        self.config = config
        self.times = PhaseTimes()
        self.alias_map: AliasMap | None = None
        self.report: PlanReport | None = None
        self._dump = ""  # <dump_folder>/autoparallel: plan.json, startup.json, placements
        # Compiled runs: Inductor's graphs after bucketing, for the report, and the seconds
        # Inductor took.
        self._compiled = False
        self._scheduled_graphs: list[torch.fx.GraphModule] = []
        self._compile_s = 0.0

    def __call__(
        self,
        model: nn.Module,
        *,
        parallel_dims,
        training,
        parallelism,
        compile_config,
        ac_config,
        dump_folder: str,
    ) -> nn.Module:
        check_parallel_dims(parallel_dims)
        compile_model = compile_config.enable and "model" in compile_config.components
        if ac_config is not None and not compile_model:
            logger.warning(
                f"AutoParallel: {type(ac_config).__qualname__} activation checkpointing runs "
                "only compiled (AutoParallel's AC pass); eager keeps every activation"
            )
        cpu.install_autoparallel_runtime()
        reset_autoparallel_caches()
        self.times = PhaseTimes()
        self._dump = os.path.join(dump_folder, "autoparallel")
        self._compiled = False
        self._scheduled_graphs = []

        names = self._capture_aliases(model)
        spec = self._plan_spec(model, parallel_dims, training, parallelism, dump_folder)
        expert_parallel = "ep" in spec.axes
        ac = ac_config is not None
        if compile_model:
            self._prepare_compile(dump_folder, ac=ac)
        cache_dir, cache_key = self._graph_cache_key(
            spec, dump_folder, usable=not expert_parallel, compile_model=compile_model, ac=ac
        )
        if cache_dir:
            parallel_model = self._load_cached(model, spec, cache_dir, cache_key)
            if parallel_model is not None:
                self._restore_aliases(parallel_model, names)
                self._log_report(source="from the graph cache")
                return parallel_model
        if expert_parallel:
            self._enable_expert_parallel(model, spec)
        try:
            parallel_model, autop, captured = self._trace_solve_apply(
                model, spec, names, compile_model=compile_model, ac=ac, serializable=bool(cache_dir)
            )
        except graph_cache.NotSerializable as e:
            # AOTAutograd refused to bundle the graphs; its failed attempt left
            # AutoParallel's state half-compiled, so plan again, without the cache.
            logger.warning(f"AutoParallel: {e}; planning again without the graph cache")
            cache_dir = ""
            parallel_model, autop, captured = self._trace_solve_apply(
                model, spec, names, compile_model=compile_model, ac=ac, serializable=False
            )
        if cache_dir:
            # Keyed again: a solve may have just written the placement file, whose
            # contents the next start's key holds.
            _, cache_key = self._graph_cache_key(
                spec, dump_folder, usable=True, compile_model=compile_model, ac=ac
            )
            self._save_cached(cache_dir, cache_key, captured, autop, parallel_model, spec)
        return parallel_model

    def _trace_solve_apply(
        self, model, spec: PlanSpec, names, *, compile_model: bool, ac: bool, serializable: bool
    ):
        """The cold start: AutoParallel's trace, constraints, solve (or placement file) and
        apply, then the alias restore and the plan report. With ``serializable``, the
        graphs are compiled in the form the graph cache saves (captured["compiled"])."""
        from autoparallel.api import AutoParallel

        captured: dict = {}
        compiling = (
            graph_cache.serializable_compile(captured) if serializable else contextlib.nullcontext()
        )
        t0 = time.perf_counter()
        with (
            compiling,
            patches.memoized_redistribute_costs(),
            AutoParallel(
                model,
                spec.input_fn,
                spec.mesh,
                mp_policy=spec.mp_policy,
                reshard_after_forward=spec.reshard_after_forward,
                # The tokens each rank's experts receive depend on the routing: traced with
                # unbacked sizes inside the expert region.
                dynamic="ep" in spec.axes,
            ) as autop,
        ):
            self.times.trace = time.perf_counter() - t0
            expert_gradients = None
            if "ep" in spec.axes:
                expert_gradients = expert_gradient_placements(autop.gm)
                check_expert_gradients(
                    expert_gradients,
                    axes=spec.axes,
                    experts=sum(".inner_experts." in fqn for fqn in names["parameters"]),
                )
            self._constrain(autop, spec)
            placement = self._solve_or_load(autop, spec)
            parallel_model, planned, executed = self._apply(
                autop, placement, compile_model=compile_model, ac=ac, serializable=serializable
            )
            joint_graph = autop.gm
        self._restore_aliases(parallel_model, names)
        self._report_plan(spec, joint_graph, planned, executed, parallel_model, expert_gradients)
        if compile_model:
            # Both graphs are compiled by now if the graph cache asked for the serializable
            # form; else the backward is, at the first backward (train_step reports it).
            self.report_compiled_plan()
        return parallel_model, autop, captured

    def _graph_cache_key(
        self, spec: PlanSpec, dump_folder: str, *, usable: bool, compile_model: bool, ac: bool
    ):
        """The graph cache's folder and this start's key; ("", {}) without a cache."""
        if not self.config.graph_cache_dir or not usable:
            return "", {}
        cache_dir = self.config.graph_cache_dir
        if not os.path.isabs(cache_dir):
            cache_dir = os.path.join(dump_folder, cache_dir)
        key = graph_cache.cache_key(
            plan_key=spec.key,
            mesh=spec.mesh,
            options={
                "eager_overlap": self.config.eager_overlap,
                "all_reduce_bucket_mb": self.config.all_reduce_bucket_mb,
                "compile": compile_model,
                "activation_checkpoint": ac,
            },
            placement_file=spec.placement_path,
        )
        return cache_dir, key

    def _load_cached(self, model, spec: PlanSpec, cache_dir: str, key: dict) -> nn.Module | None:
        """The parallel model rebuilt from the graph cache, or None (a cold start follows)."""
        t0 = time.perf_counter()
        entry, where = graph_cache.load(cache_dir, key)
        parallel_model = None
        if entry is not None:
            try:
                parallel_model = graph_cache.build_parallel_module(model, entry, spec.mesh)
            except Exception as e:  # an entry that cannot be rebuilt costs a cold start only
                where = f"{where} not usable ({type(e).__name__}: {e})"
        # Every rank must run the graphs of one start: a rank without a usable entry traces
        # and schedules its collectives anew, so then every rank does.
        usable = 0.0 if parallel_model is None else 1.0
        if cpu.agree_across_ranks(usable, device=spec.mesh.device_type) < 1.0:
            log = logger.warning if entry is not None and parallel_model is None else logger.info
            if parallel_model is not None:
                where = "another rank has no usable entry"
            log(f"AutoParallel: graph cache miss ({where}): tracing")
            return None
        if spec.mesh.ndim != 1:
            # AutoParallel's apply creates the flattened mesh's process group, which the
            # cached collectives may name; new_group is collective, so only once every rank
            # takes this path.
            spec.mesh._flatten()
        self.times.graph_cache_load = time.perf_counter() - t0
        self.report = entry.report
        logger.info(
            f"AutoParallel: graph cache hit ({where}): no trace, solve or apply; loaded in "
            f"{self.times.graph_cache_load:.1f}s"
        )
        return parallel_model

    def _save_cached(self, cache_dir, key, captured, autop, parallel_model, spec) -> None:
        if "compiled" not in captured:
            return  # serializable_compile could not serialize (it said why)
        t0 = time.perf_counter()
        try:
            entry = graph_cache.make_entry(
                key=key,
                captured=captured,
                autop=autop,
                parallel_model=parallel_model,
                input_placement=spec.input_placement,
                report=self.report,
            )
            path = graph_cache.save(cache_dir, entry)
        except Exception as e:  # the run trains as well without a cache entry
            logger.warning(f"AutoParallel: graph cache not saved ({type(e).__name__}: {e})")
            return
        self.times.graph_cache_save = time.perf_counter() - t0
        logger.info(
            f"AutoParallel: graph cache saved to {path} ({os.path.getsize(path) / 2**20:.1f} "
            f"MiB, {self.times.graph_cache_save:.1f}s)"
        )

    def _capture_aliases(self, model: nn.Module) -> dict[str, list[str]]:
        """Record the alias groups and every FQN of the original model before tracing."""
        t0 = time.perf_counter()
        self.alias_map = AliasMap.capture(model)
        names = _names(model)
        self.times.alias_capture = time.perf_counter() - t0
        if self.alias_map:
            logger.info(f"AutoParallel: captured aliases before tracing:\n{self.alias_map}")
        return names

    def _enable_expert_parallel(self, model: nn.Module, spec: PlanSpec) -> None:
        """Run each MoE layer's routed experts as one local_map region (torchtitan_ext.moe):
        whole experts on each ep rank, tokens sent to them with all_to_all."""
        layers = enable_expert_parallel(model, mesh=spec.mesh, axes=tuple(spec.axes))
        if not layers:
            raise ValueError(
                f"--parallelism.expert_parallel_degree {spec.mesh.size(spec.axes.index('ep'))}"
                f": {type(model).__qualname__} has no MoE layer (torchtitan's RoutedExperts)"
            )
        logger.info(
            f"AutoParallel: expert parallelism on {layers} MoE layer(s): experts sharded on "
            "ep, tokens exchanged with all_to_all in a local_map region"
        )

    def _plan_spec(self, model, parallel_dims, training, parallelism, dump_folder) -> PlanSpec:
        """What the plan is for: mesh, global input shapes, precision, placement
        constraints of inputs and logits, and the key a placement file must match."""
        from autoparallel.input_validation import ForwardInputs
        from torch.distributed.fsdp import MixedPrecisionPolicy

        axes = mesh_axes(parallel_dims, spmd_backend=parallelism.spmd_backend)
        mesh = parallel_dims.get_mesh(list(axes) if len(axes) > 1 else next(iter(axes)))
        assert tuple(mesh.shape) == tuple(axes.values()), (mesh.shape, axes)
        batch = global_batch(training, parallel_dims)
        vocab_size = model.config.vocab_size
        mesh_device = torch.device(mesh.device_type)

        def input_fn():
            # Global shapes of one microbatch, called as the Trainer calls the model:
            # model(tokens, positions=positions), positions int64 like the dataloader's.
            tokens = torch.randint(0, vocab_size, (batch, training.seq_len), device=mesh_device)
            positions = torch.arange(training.seq_len, device=mesh_device).repeat(batch, 1)
            return ForwardInputs(args=(tokens,), kwargs={"positions": positions})

        param_dtype = TORCH_DTYPE_MAP[training.mixed_precision_param]
        reduce_dtype = TORCH_DTYPE_MAP[training.mixed_precision_reduce]
        model_dtype = TORCH_DTYPE_MAP[training.dtype]
        mp_policy = None
        if param_dtype != model_dtype or reduce_dtype != model_dtype:
            mp_policy = MixedPrecisionPolicy(
                param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False
            )
        # Inputs: the batch on the data axes, replicated on tp. Logits: the batch on the
        # data axes and, on tp, what torchtitan's loss takes: vocab-sharded under the
        # spmd_types backend (its loss-parallel cross-entropy when tp > 1), the full
        # vocabulary under the DTensor backends.
        vocab_parallel = parallelism.spmd_backend == "spmd_types"
        low, high = memory_bounds(self.config, parallel_dims)
        return PlanSpec(
            axes=list(axes),
            mesh=mesh,
            batch=batch,
            input_fn=input_fn,
            mp_policy=mp_policy,
            reshard_after_forward=get_fsdp_reshard_after_forward_policy(
                parallelism.fsdp_reshard_after_forward, parallel_dims.pp_enabled
            ),
            input_placement=tuple(Shard(0) if a in _DATA_AXES else Replicate() for a in axes),
            logits_placement=tuple(
                Shard(0) if a in _DATA_AXES else (Shard(2) if vocab_parallel else Replicate())
                for a in axes
            ),
            memory_bounds=(low, high),
            placement_path=placement_path(self.config, dump_folder),
            key=plan_key(
                model_config=model.config,
                parallel_dims=parallel_dims,
                training=training,
                parallelism=parallelism,
                config=self.config,
            ),
        )

    def _constrain(self, autop, spec: PlanSpec) -> None:
        low, high = spec.memory_bounds
        logger.info(
            f"AutoParallel: planning on mesh {dict(zip(spec.axes, spec.mesh.shape, strict=True))}"
            f", global batch {spec.batch} x {spec.key['inputs'][1]}, parameter memory per rank "
            f"in [{low:.3g}, {high:.3g}] of the model"
        )
        autop.add_input_constraints([spec.input_placement, spec.input_placement])
        autop.add_output_constraints([spec.logits_placement])
        autop.add_parameter_memory_constraint(low=low, high=high)
        constrain_alias_placements(autop, self.alias_map)
        _replicate_router_state(autop)
        if "dp_replicate" in spec.axes and len(spec.axes) > 1:
            _replicate_parameters(autop, axis=spec.axes.index("dp_replicate"))
        if self.config.parallel_matmuls:
            _constrain_matmuls(autop, axes=spec.axes, batch=spec.batch)

    def _solve_or_load(self, autop, spec: PlanSpec):
        """Solve, or load the placement file (after checking it was solved for this very
        plan); save the solution to the placement file and, if asked, the dumps."""
        from autoparallel.serialization import load_placements, save_placements

        path = spec.placement_path
        t0 = time.perf_counter()
        solved = not (path and os.path.exists(path))
        if solved:
            placement = autop.optimize_placement()
        else:
            check_placement_file(path, spec.key)
            placement = load_placements(autop.sharding_optimizer, path)
            logger.info(f"AutoParallel: loaded placements from {path} (no solve)")
        self.times.solve = time.perf_counter() - t0
        if not _is_rank0():
            return placement
        os.makedirs(self._dump, exist_ok=True)
        # Each file is replaced whole, AutoParallel's placements and our key in one write.
        if solved and path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with written_whole(path) as tmp:
                save_placements(autop.sharding_optimizer, tmp)
                _add_plan_key(tmp, spec.key)
            logger.info(f"AutoParallel: saved placements to {path}")
        dumped = os.path.join(self._dump, "placements.json")
        if self.config.dump_placements and solved:
            with written_whole(dumped) as tmp:
                save_placements(autop.sharding_optimizer, tmp)
                _add_plan_key(tmp, spec.key)
            write_whole(
                os.path.join(self._dump, "solution.txt"),
                autop.sharding_optimizer.get_log(colored=False),
            )
        elif self.config.dump_placements:
            with written_whole(dumped) as tmp:
                shutil.copyfile(path, tmp)
        return placement

    def _apply(
        self, autop, placement, *, compile_model: bool, ac: bool, serializable: bool
    ) -> tuple[nn.Module, dict[str, torch.fx.GraphModule], dict[str, torch.fx.GraphModule]]:
        """apply_placement, with our compilers for the forward and backward AutoParallel
        builds: Inductor (--compile.enable) or our eager runner. Records the graphs as
        planned and, eager, as each step executes them (bucketed), for the plan report."""
        planned: dict[str, torch.fx.GraphModule] = {}
        executed: dict[str, torch.fx.GraphModule] = {}

        def compile_graph(gm, example_inputs, tag_forward=False):
            # Provenance ("from_node": each node's history of passes, for Inductor's
            # provenance tracking, off by default) is dropped: Inductor's bucketing gives every
            # node it creates a deep copy of the history of every node in its bucket
            # (torch 2.14, bucketing._populate_node_meta), quadratic in the layer count
            # for the eager plan's one bucket (debug model, 8 layers: apply 9.1 -> 7.2 s).
            for node in gm.graph.nodes:
                node.meta.pop("from_node", None)
            # The training forward, its backward (inputs: tangents), the inference forward.
            tangents = any(
                n.op == "placeholder" and n.name.startswith("tangents") for n in gm.graph.nodes
            )
            key = "forward" if tag_forward else "backward" if tangents else "inference"
            if key == "inference":
                # Used by validation alone: its runner (the overlap scheduler, ~1 s) is
                # built at its first call; eager also when compiled (no compile for it).
                runner = None

                def run_inference(args):
                    nonlocal runner
                    if runner is None:
                        runner = self._eager_runner(gm)
                    return runner(args)

                run_inference._boxed_call = True
                return run_inference
            if compile_model:
                # Inductor's passes rewrite gm in place: the report's planned graph is a copy.
                # Executed: until report_compiled_plan() reads Inductor's bucketed graphs.
                planned[key] = executed[key] = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
                return self._inductor_compile(gm, example_inputs, backward=key == "backward")
            runner = self._eager_runner(gm)
            planned[key] = gm
            executed[key] = runner if self.config.eager_overlap else gm
            # The graph cache saves AOTAutograd's serializable form, which takes OutputCode.
            return graph_cache.eager_output_code(runner) if serializable else runner

        autop.compiler_fn = compile_graph
        # AutoParallel's activation-checkpointing pass tags the joint graph before
        # AOTAutograd partitions it (what autoparallel_backend does for Dynamo's graph).
        joint_pass = _ac_joint_pass if compile_model and ac else None
        self._compile_s = 0.0
        t0 = time.perf_counter()
        with torch._functorch.config.patch(joint_custom_pass=joint_pass):
            parallel_model = autop.apply_placement(placement)
        self.times.apply = time.perf_counter() - t0 - self._compile_s
        self.times.compile = self._compile_s
        return parallel_model, planned, executed

    def _inductor_compile(self, gm: torch.fx.GraphModule, example_inputs, *, backward: bool):
        """Inductor's code for one of AutoParallel's graphs, with the passes AutoParallel's
        compile backend (autoparallel_backend) runs: collective bucketing, comm/compute
        overlap scheduling and, with all_reduce_bucket_mb, all-reduce bucketing.

        AutoParallel a54c252 expects torch.compile over its module: Dynamo traces the
        module again and AOTAutograd makes a second joint graph, at every start (their
        caches bypass AutoParallel's module), and its partitioner replays the first one's
        choices. We compile the graphs AutoParallel already partitioned, as its API did
        before a54c252 (compile=True: compile_fx_inner as the compiler): no Dynamo, so
        no retrace at step 1, and the result is AOTAutograd's serializable form, which
        the graph cache keeps for warm starts. Called by AOTAutograd at apply (the
        backward at the first backward without the graph cache: the patches are
        entered here, not around apply)."""
        from autoparallel.api import _suppress_wait_tensor_side_effect
        from autoparallel.compile import _INDUCTOR_OVERLAP_PATCHES
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx_inner
        from torch._inductor.fx_passes import overlap_scheduling

        patches = dict(_INDUCTOR_OVERLAP_PATCHES)
        if self.config.all_reduce_bucket_mb > 0:
            # The overlap scheduler buckets FSDP's all-gathers and reduce-scatters, but leaves
            # every gradient all-reduce on its own (44 a step for the debug model's DDP-like
            # plan, each a gloo round trip); Inductor's all-reduce bucketing pass is off by
            # default. Debug model, 2 CPU ranks, 2 rounds: 1.62 s/step unbucketed, 1.52 at
            # 4 MB (6 buckets), 1.66 at 25 MB (one bucket, issued after the last gradient).
            # Again 2026-12-04, 3 interleaved rounds: 1.08-1.16 at 4 MB, 1.19-1.21 at 64 MB
            # (one all-reduce after the backward, as torch DDP's; DDP compiled 1.05-1.07).
            # torch 2.14's greedy bucketing reads the cap of bucket 0 for every bucket, so
            # DDP's smaller first bucket cannot be asked for. A module-level partial keeps the
            # config picklable (Inductor pickles its config for cache keys).
            patches["bucket_all_reduces_fx"] = "all"
            patches["bucket_all_reduces_fx_bucket_size_determinator"] = functools.partial(
                _bucket_cap_mb, self.config.all_reduce_bucket_mb
            )
        schedule = overlap_scheduling.schedule_overlap_bucketing_from_inductor_configs

        def recording_schedule(graph, *args, **kwargs):
            result = schedule(graph, *args, **kwargs)
            self._scheduled_graphs.append(graph)  # bucketed and reordered in place
            return result

        # Inductor imports the pass from this module each time it runs it.
        overlap_scheduling.schedule_overlap_bucketing_from_inductor_configs = recording_schedule
        t0 = time.perf_counter()
        try:
            with _suppress_wait_tensor_side_effect(), inductor_config.patch(patches):
                compiled = compile_fx_inner(gm, example_inputs, is_backward=backward)
        finally:
            overlap_scheduling.schedule_overlap_bucketing_from_inductor_configs = schedule
        self._compile_s += time.perf_counter() - t0
        return compiled

    def _eager_runner(self, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        """The eager form of one of AutoParallel's graphs, a boxed callable.

        AutoParallel runs its eager graphs through torch.fx.Interpreter, Python work per node
        on every step (~2,100 nodes for the debug model), and issues one collective per
        parameter. We run the graph's own generated code instead (the same ops in the same
        order; the boxed calling convention frees each input after its last use, as the
        Interpreter does), after Inductor's overlap scheduler bucketed its collectives and
        moved them to overlap compute. Debug model, 2 CPU ranks, eager FSDP-like plan
        against eager torchtitan FSDP, one benchmark of 3 interleaved rounds each: 1.71x
        its step time with the Interpreter, 1.34x with generated code, 0.97x with bucketing
        and overlap (131 -> 8 collectives a step; a 6-variant run: 1.33x, rounds 0.84-1.55x).
        """
        from autoparallel.compile import _INDUCTOR_OVERLAP_PATCHES
        from torch._inductor import config as inductor_config
        from torch._inductor.fx_passes.bucketing import bucket_all_reduce
        from torch._inductor.fx_passes.overlap_scheduling import (
            schedule_overlap_bucketing_from_inductor_configs,
        )

        runner = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
        if self.config.eager_overlap:
            cpu.install_compile_runtime()
            with inductor_config.patch(
                {
                    # The settings autoparallel_backend() compiles with, less what only
                    # Inductor uses: dependencies for its scheduler, fused regions it codegens.
                    **_INDUCTOR_OVERLAP_PATCHES,
                    "aten_distributed_optimizations.insert_overlap_deps": False,
                    "aten_distributed_optimizations.enable_fusion_regions": False,
                    # The scheduler's ordering hints can form a cycle (torch 2.14; the DDP-like
                    # plan's backward, with this machine's measured bandwidth: "detected 2
                    # cyclic extra dep(s)", then RuntimeError). Autofix drops those hints;
                    # the graph's own dependencies still order every node.
                    "aten_distributed_optimizations.overlap_scheduling_autofix_cycles": True,
                }
            ):
                schedule_overlap_bucketing_from_inductor_configs(runner)
            if self.config.all_reduce_bucket_mb > 0:
                bucket_all_reduce(
                    runner, functools.partial(_bucket_cap_mb, self.config.all_reduce_bucket_mb)
                )
        runner.graph.set_codegen(torch.fx.graph._BoxedCodeGen())
        runner.recompile()
        assert runner._boxed_call  # AOTAutograd calls it with one list of inputs
        return runner

    def _restore_aliases(self, parallel_model: nn.Module, names: dict[str, list[str]]) -> None:
        """Re-register the alias names the engine dropped, keep groups tied through init,
        check names now and (wrapped around init_weights) again once values exist."""
        t0 = time.perf_counter()
        restored = self.alias_map.restore(parallel_model)
        self.alias_map.keep_tied(parallel_model)
        self.times.alias_restore = time.perf_counter() - t0
        if self.alias_map:
            logger.info(
                "AutoParallel: alias names re-registered on the parallel model: "
                f"{restored or 'none (the engine kept them)'}"
            )
        self._check_aliases(parallel_model, when="after parallelization", names=names)
        logger.info(
            f"AutoParallel: {len(names['parameters'])} parameter, {len(names['buffers'])} "
            f"buffer and {len(names['state_dict'])} state_dict names match the original model"
        )
        self._wrap_init(parallel_model)

    def _report_plan(
        self, spec: PlanSpec, joint_graph, planned, executed, parallel_model, expert_gradients
    ) -> None:
        self.report = build_report(
            mesh_axes=spec.axes,
            mesh_shape=tuple(spec.mesh.shape),
            joint_graph=joint_graph,
            planned=planned,
            executed=executed,
            parallel_model=parallel_model,
            expert_gradients=expert_gradients,
        )
        self._log_report(
            source=f"trace {self.times.trace:.1f}s, solve {self.times.solve:.1f}s, "
            f"apply {self.times.apply:.1f}s"
            + (f", compile {self.times.compile:.1f}s" if self.times.compile else ""),
        )

    def _log_report(self, *, source: str) -> None:
        logger.info(f"AutoParallel: {source}. Plan:\n  " + "\n  ".join(self.report.lines()))
        if _is_rank0():
            os.makedirs(self._dump, exist_ok=True)
        self._write_report(self._dump)

    def report_compiled_plan(self) -> bool:
        """Once Inductor compiled the forward and backward, update the plan report with their
        (bucketed) collectives, log and write it; True when done or nothing to do."""
        if not self._compiled or self.report.compiled:
            return True
        if len(self._scheduled_graphs) < 2:
            return False
        self.report.collectives = collectives(self._scheduled_graphs)
        self.report.compiled = self.report.bucketed = True
        logger.info(
            f"AutoParallel: compiled plan (Inductor took {self._compile_s:.1f}s):\n  "
            + "\n  ".join(self.report.lines())
        )
        self._write_report(self._dump)
        return True

    def _write_report(self, dump: str) -> None:
        if _is_rank0():
            write_whole(os.path.join(dump, "plan.json"), self.report.to_json())

    def _prepare_compile(self, dump_folder: str, *, ac: bool) -> None:
        """Before a compiled start (graph cache or cold): Inductor's cache folder (its C++
        kernels and its FX graph cache) under the dump folder, its overlap scheduler working
        on CPU, _grouped_mm's input strides. The FX graph cache serves only expert-parallel
        graphs (the others are traced without a ShapeEnv: "No shape env"); the graph cache
        serves the others."""
        cpu.install_compile_runtime()
        grouped_mm_inputs_keep_eager_strides()
        if self.config.compile_cache_dir:
            cache = os.path.join(dump_folder, self.config.compile_cache_dir)
            # Inductor reads this at each lookup; the graph cache's compiled graphs load
            # their C++ kernels from it.
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(cache)
            logger.info(f"AutoParallel: compile caches in {os.environ['TORCHINDUCTOR_CACHE_DIR']}")
        self._compiled = True
        logger.info(
            "AutoParallel: Inductor compiles the forward and backward AutoParallel builds "
            f"(bucketing and overlap scheduling on, AC pass {'on' if ac else 'off'})"
        )

    def _check_aliases(
        self, module: nn.Module, *, when: str, names: dict[str, list[str]] | None = None
    ) -> None:
        """verify() the alias groups and, given the original model's names, check that the
        module has exactly those FQNs (remove_duplicate=False) and state_dict keys."""
        assert self.alias_map is not None
        if self.config.alias_check == "off":
            return
        t0 = time.perf_counter()
        try:
            self.alias_map.verify(module)
            if names is not None:
                _check_same_names(names, _names(module))
        except AliasError as e:
            if self.config.alias_check == "error":
                raise
            logger.warning(f"AutoParallel: alias check {when} failed: {e}")
        self.times.alias_verify += time.perf_counter() - t0

    def _wrap_init(self, module: nn.Module) -> None:
        # Runs after AutoParallel's own DTensor-aware init_weights wrapper and alias
        # keep_tied: time the init, then verify the aliases once values exist.
        init_weights = module.init_weights

        def timed_init_weights(*args, **kwargs):
            t0 = time.perf_counter()
            result = init_weights(*args, **kwargs)
            self.times.init = time.perf_counter() - t0
            self._check_aliases(module, when="after init_weights")
            if _is_rank0() and self._dump:
                # Each alias name shares its group's storage: all names cost what the
                # deduplicated objects cost (alias_extra_bytes 0).
                everything = unique_storage_bytes(module)
                objects = storage_bytes([*module.parameters(), *module.buffers()])
                startup = {
                    "seconds": dataclasses.asdict(self.times),
                    "unique_storage_bytes": everything,
                    "alias_extra_bytes": everything - objects,
                }
                write_whole(os.path.join(self._dump, "startup.json"), json.dumps(startup, indent=2))
            return result

        module.init_weights = timed_init_weights


def mesh_axes(parallel_dims, *, spmd_backend: str) -> dict[str, int]:
    """The mesh AutoParallel plans over: torchtitan's data and tp axes of size > 1, in mesh
    order, or the sharded data axis alone (size 1 on one rank). The sharded data axis is
    "fsdp" under the partial_dtensor backend and "dp_shard" under the others. With expert
    parallelism, torchtitan's sparse mesh: dp_replicate and efsdp (when > 1) and ep, whose
    product is the data-parallel world (ep > 1 runs with tp 1)."""
    if parallel_dims.ep > 1:
        efsdp = parallel_dims.dp_shard // parallel_dims.ep
        sizes = {"dp_replicate": parallel_dims.dp_replicate, "efsdp": efsdp}
        return {**{axis: size for axis, size in sizes.items() if size > 1}, "ep": parallel_dims.ep}
    shard_axis = "fsdp" if spmd_backend == "partial_dtensor" else "dp_shard"
    sizes = {
        "dp_replicate": parallel_dims.dp_replicate,
        shard_axis: parallel_dims.dp_shard,
        "tp": parallel_dims.tp,
    }
    return {axis: size for axis, size in sizes.items() if size > 1} or {shard_axis: 1}


def check_parallel_dims(parallel_dims) -> None:
    """ValueError for the degrees AutoParallel does not plan here."""
    unplanned = {
        "pipeline_parallel_degree": parallel_dims.pp,
        "context_parallel_degree": parallel_dims.cp,
    }
    unplanned = {name: degree for name, degree in unplanned.items() if degree > 1}
    if unplanned:
        given = ", ".join(f"--parallelism.{name} {degree}" for name, degree in unplanned.items())
        raise ValueError(
            f"AliasAwareAutoParallel plans data, tensor and expert parallelism only, not "
            f"{given}: set them to 1, or use torchtitan's parallelization "
            "(--parallelize torchtitan)"
        )
    if parallel_dims.ep > 1 and parallel_dims.tp > 1:
        raise ValueError(
            f"AliasAwareAutoParallel plans --parallelism.expert_parallel_degree "
            f"{parallel_dims.ep} with data parallelism only, not with "
            f"--parallelism.tensor_parallel_degree {parallel_dims.tp}: set one of them to 1"
        )


def _ac_joint_pass(graph_module: torch.fx.GraphModule, joint_inputs) -> torch.fx.GraphModule:
    """AutoParallel's activation-checkpointing pass, as AOTAutograd's joint_custom_pass
    (the signature it calls; "auto": stages of sqrt(recomputable memory))."""
    from autoparallel.graph_passes.activation_checkpointing import ac_joint_pass

    ac_joint_pass(graph_module.graph, "auto")
    return graph_module


def memory_bounds(config: AliasAwareAutoParallel.Config, parallel_dims) -> tuple[float, float]:
    """The parameter memory each rank may hold, as fractions of the model: the config's
    bounds, defaulting to sharded on dp_shard x tp and replicated on a replicate-only mesh."""
    replicate_only = parallel_dims.dp_shard == 1 and parallel_dims.tp == 1
    default_low, default_high = (
        (1.0, 1.0) if replicate_only else (0.0, 1.0 / (parallel_dims.dp_shard * parallel_dims.tp))
    )
    low = default_low if config.param_memory_low is None else config.param_memory_low
    high = default_high if config.param_memory_high is None else config.param_memory_high
    if not 0.0 <= low <= high <= 1.0:
        # The pair as used; an unset bound is this mesh's default.
        low_is = "" if config.param_memory_low is not None else " (unset)"
        high_is = "" if config.param_memory_high is not None else " (unset)"
        raise ValueError(
            f"--autoparallel.param_memory_low/high must satisfy 0 <= low <= high <= 1, got "
            f"low {low:g}{low_is}, high {high:g}{high_is}: pass bounds in that order, or "
            f"leave them unset (this mesh: low {default_low:g}, high {default_high:g})"
        )
    return low, high


def placement_path(config: AliasAwareAutoParallel.Config, dump_folder: str) -> str:
    path = config.placement_file
    if path and not os.path.isabs(path):
        path = os.path.join(dump_folder, path)
    return path


def global_batch(training, parallel_dims) -> int:
    """Rows of one microbatch over all data-parallel ranks."""
    return training.local_batch_size * parallel_dims.dp_replicate * parallel_dims.dp_shard


def plan_key(*, model_config, parallel_dims, training, parallelism, config) -> dict:
    """What a solution is valid for: the model (its config, after update_from_config), the
    mesh, the global input shapes, the dtypes, the constraints, and the engine versions
    (AutoParallel's: a digest of its installed source). Written into placement files; a
    file whose key differs is refused."""
    # The config's repr names init functions by address ("<function normal_ at 0x7f..>").
    model = re.sub(r" at 0x[0-9a-f]+", "", repr(model_config))
    return {
        "model": f"{type(model_config).__qualname__} "
        f"{hashlib.sha256(model.encode()).hexdigest()[:16]}",
        "mesh": mesh_axes(parallel_dims, spmd_backend=parallelism.spmd_backend),
        "inputs": [global_batch(training, parallel_dims), training.seq_len],
        "dtypes": {
            "param": training.mixed_precision_param,
            "reduce": training.mixed_precision_reduce,
            "model": training.dtype,
        },
        "reshard_after_forward": parallelism.fsdp_reshard_after_forward,
        "param_memory": list(memory_bounds(config, parallel_dims)),
        "parallel_matmuls": config.parallel_matmuls,
        "torch": torch.__version__,
        "autoparallel": graph_cache.autoparallel_version(),
    }


_PLAN_KEY_FIELD = "torchtitan_ext_plan_key"


def _add_plan_key(path: str, key: dict) -> None:
    # AutoParallel's load_placements reads only its own fields and ignores this one. Called
    # on the temporary file save_placements wrote, before it replaces the placement file.
    with open(path) as f:
        data = json.load(f)
    data[_PLAN_KEY_FIELD] = key
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def check_placement_file(path: str, key: dict) -> None:
    """ValueError unless the placement file was solved for this plan (plan_key)."""
    fix = "delete it to solve again, or pass another --autoparallel.placement_file"
    try:
        with open(path) as f:
            saved = json.load(f).get(_PLAN_KEY_FIELD)
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"placement file {path} is not readable JSON ({e}): {fix}") from e
    if saved is None:
        raise ValueError(
            f"placement file {path} has no torchtitan_ext plan key (not saved by this "
            f"project's --autoparallel.placement_file), so it cannot be checked: {fix}"
        )
    differ = [name for name in key if saved.get(name) != key[name]]
    if differ:
        was = ", ".join(f"{name} {saved.get(name)}" for name in differ)
        now = ", ".join(f"{name} {key[name]}" for name in differ)
        raise ValueError(f"placement file {path} was solved for {was}; this run has {now}: {fix}")


def check_before_launch(config, parallel_dims) -> None:
    """What would otherwise fail only after every rank started, checked on the parsed
    config and its ParallelDims (run_train.sh runs this before torchrun): the degrees are
    ones AutoParallel plans, the engine is installed, and a placement file was solved for
    this very plan, and the memory bounds are in order. Raises ValueError or ImportError
    naming the problem and the fix."""
    check_parallel_dims(parallel_dims)
    if parallel_dims.ep > 1 and not list(config.model_spec.model.traverse(RoutedExperts.Config)):
        raise ValueError(
            f"--parallelism.expert_parallel_degree {parallel_dims.ep}: the model of this "
            "config has no MoE layer; use an MoE config (qwen3_moe_debug_autoparallel, "
            "deepseek_v3_debugmodel_autoparallel, ...) or expert_parallel_degree 1"
        )
    memory_bounds(config.autoparallel, parallel_dims)  # raises if out of order
    require_autoparallel()
    path = placement_path(config.autoparallel, config.dump_folder)
    if path and os.path.exists(path):
        check_placement_file(path, plan_key_of(config, parallel_dims))


def plan_key_of(config, parallel_dims) -> dict:
    """plan_key() of an AutoParallelTrainer.Config, as the component computes it on the
    ranks. Updates the model config from the trainer config, as the Trainer does."""
    config.model_spec.model.update_from_config(config=config)
    return plan_key(
        model_config=config.model_spec.model,
        parallel_dims=parallel_dims,
        training=config.training,
        parallelism=config.parallelism,
        config=config.autoparallel,
    )


def plan_model(config, *, world_size: int, dump_folder: str):
    """Parallelize an AutoParallelTrainer.Config's model as the Trainer does, on the meta
    device, without training or initializing it: for dry runs, tests and benchmarks.
    Needs a process group of ``world_size`` ranks (a fake one is enough). Returns the meta
    model, the parallel model and the component (its ``report`` and ``times``)."""
    from torchtitan.distributed import ParallelDims

    cpu.install_runtime()  # what the Trainer does first: meshes are then built on CPU
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


def reset_autoparallel_caches() -> None:
    """Clear AutoParallel's strategy and cost caches. They are keyed without the mesh, so a
    second plan in one process for a mesh of another size would reuse stale strategies and
    get an infeasible ILP."""
    from autoparallel.cost_models.collective_runtime_estimation import reset_comms_cost_cache
    from autoparallel.cost_models.compute_estimation import reset_compute_cost_cache
    from autoparallel.shardings.placement_options import reset_placement_options_cache

    reset_placement_options_cache()
    reset_comms_cost_cache()
    reset_compute_cost_cache()


def constrain_alias_placements(autop, alias_map: AliasMap) -> None:
    """Give every name of an alias group one placement, and replicate view bases.

    The joint graph has one input per FQN, also for names of one tensor (AutoParallel keeps
    some alias names as separate, possibly unused, inputs), and the solver would place each
    on its own; but the names are one object after restore(), which can hold one placement.
    A buffer view is re-derived from its base's local data, so the base stays replicated.
    """
    from torch._functorch._aot_autograd.fx_utils import (
        get_named_buffer_nodes,
        get_named_param_nodes,
    )

    opt = autop.sharding_optimizer
    nodes = {**get_named_param_nodes(opt.graph), **get_named_buffer_nodes(opt.graph)}
    for group in alias_map.groups:
        inputs = [nodes[f] for f in group.fqns if f in nodes]
        for other in inputs[1:]:
            opt._add_paired_output_constraint(inputs[0], other, "alias_group")
    for view in alias_map.views:
        base = nodes.get(view.base)
        if base is not None:
            opt.add_node_constraint(base, (Replicate(),) * autop.mesh.ndim, "alias_view_base")


def _replicate_parameters(autop, *, axis: int) -> None:
    """Keep every parameter replicated on the dp_replicate mesh axis (HSDP: replicate
    across groups, shard within each). The memory budget alone bounds only the total, and
    the solver may as well shard on dp_replicate and replicate on dp_shard."""
    from torch._functorch._aot_autograd.fx_utils import get_named_param_nodes

    opt = autop.sharding_optimizer
    for node in get_named_param_nodes(opt.graph).values():
        _keep_strategies(
            opt,
            opt._normalize_node(node),
            lambda placements: placements[axis] == Replicate(),
            name="replicate_parameter",
        )


def _replicate_router_state(autop) -> None:
    """Keep MoE load-balancing buffers (torchtitan's MoE: tokens_per_expert_E, expert_bias_E)
    replicated: torchtitan's optimizer hook reads each as the whole per-expert vector (it
    rewraps the local tensor as Replicate), so a sharded buffer breaks the bias update. The
    solver would shard them on ep, where the experts are."""
    from torch._functorch._aot_autograd.descriptors import (
        BufferAOTInput,
        InputMutationAOTOutput,
    )
    from torch._functorch._aot_autograd.fx_utils import get_named_buffer_nodes

    def is_router_state(fqn: str) -> bool:
        return fqn.endswith((".tokens_per_expert_E", ".expert_bias_E"))

    opt = autop.sharding_optimizer
    nodes = [
        node for fqn, node in get_named_buffer_nodes(opt.graph).items() if is_router_state(fqn)
    ]
    # The buffer's new value (tokens_per_expert_E += counts in the forward) is a graph output
    # copied into the buffer after each step: it must have the buffer's placement.
    output = opt.graph.output_node()
    for value, desc in zip(output.args[0], output.meta["desc"], strict=True):
        if (
            isinstance(desc, InputMutationAOTOutput)
            and isinstance(desc.mutated_input, BufferAOTInput)
            and is_router_state(desc.mutated_input.target)
        ):
            nodes.append(value)
    for node in nodes:
        _keep_strategies(
            opt,
            opt._normalize_node(node),
            lambda placements: all(p == Replicate() for p in placements),
            name="replicate_router_state",
        )


def _constrain_matmuls(autop, *, axes: list[str], batch: int) -> None:
    """Constrain each forward matmul's output to Shard(0) (the batch) on every data axis and,
    on a tp axis, to Shard(last dim) (column-parallel) or Partial (row-parallel).

    AutoParallel traces linear layers as aten.einsum with the weight as [in, out]. Its public
    add_node_constraint takes one placement for the whole mesh; here several are allowed.
    """
    opt = autop.sharding_optimizer

    def allowed(placements, *, ndim: int) -> bool:
        return all(
            (p == Shard(ndim - 1) or p.is_partial()) if axis == "tp" else p == Shard(0)
            for p, axis in zip(placements, axes, strict=True)
        )

    for node in autop.gm.graph.find_nodes(op="call_function", target=torch.ops.aten.einsum.default):
        value = node.meta.get("val")
        if node.meta.get("partitioner_tag") != "is_forward" or value.shape[0] != batch:
            continue
        _keep_strategies(
            opt,
            opt._normalize_node(node),
            functools.partial(allowed, ndim=value.dim()),
            name="parallel_matmul",
        )


def _bucket_cap_mb(cap_mb: float, bucket: int) -> float:
    return cap_mb


def _keep_strategies(opt, node, keep, *, name: str) -> None:
    """Constrain ``node`` to the strategies whose output placements (one per mesh axis)
    satisfy ``keep``. AutoParallel's public add_node_constraint takes one placement for the
    whole mesh; this is the optimizer's underlying constraint, which it calls itself."""
    indices = [
        i
        for i, strategy in enumerate(opt.strats[node].strategies)
        if keep(strategy.output_specs.placements)
    ]
    opt._add_node_constraint(node, output_constraint_indices=indices, constraint_name=name)


def _names(module: nn.Module) -> dict[str, list[str]]:
    return {
        "parameters": [n for n, _ in module.named_parameters(remove_duplicate=False)],
        "buffers": [n for n, _ in module.named_buffers(remove_duplicate=False)],
        "state_dict": list(module.state_dict(keep_vars=True)),
    }


def _check_same_names(expected: dict[str, list[str]], actual: dict[str, list[str]]) -> None:
    problems = []
    for kind, names in expected.items():
        missing = sorted(set(names) - set(actual[kind]))
        extra = sorted(set(actual[kind]) - set(names))
        if missing:
            problems.append(f"{kind} missing on the parallel model: {', '.join(missing)}")
        if extra:
            problems.append(f"{kind} the original model does not have: {', '.join(extra)}")
    if problems:
        raise AliasError(
            "parallel model names differ from the original:\n  " + "\n  ".join(problems)
        )


def _is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
