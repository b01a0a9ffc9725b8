"""AliasAwareAutoParallel: torchtitan's ``parallelize_fn``, implemented with Meta's AutoParallel.

The component receives torchtitan's meta-device model and returns the module AutoParallel
built, with every alias name of the original model registered on it, kept tied through
``init_weights`` and verified. Its call runs the phases of a start in order, each in its
own module: spec, graph_cache, expert_parallel, trace (here), constraints, placements
(solve), compiler (apply and compile), alias_check, report.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Literal

from torch import nn
from torchtitan.config import Configurable
from torchtitan.tools.logging import logger

from torchtitan_ext import patches
from torchtitan_ext.aliases import AliasMap
from torchtitan_ext.parallelize.alias_check import AliasGuard
from torchtitan_ext.parallelize.compiler import Compiler, prepare_inductor
from torchtitan_ext.parallelize.constraints import constrain
from torchtitan_ext.parallelize.expert_parallel import (
    check_expert_gradients,
    enable_expert_parallel,
    expert_gradient_placements,
)
from torchtitan_ext.parallelize.graph_cache import GraphCache
from torchtitan_ext.parallelize.placements import solve_or_load
from torchtitan_ext.parallelize.report import (
    PhaseTimes,
    PlanReport,
    PlanReporter,
    build_report,
    write_startup,
)
from torchtitan_ext.parallelize.spec import PlanSpec, parameter_ranks, require_autoparallel


@dataclass(frozen=True, slots=True)
class Start:
    """What one call of the component did: its phases' seconds, the aliases it kept and its
    plan report (completed in place once Inductor compiled both graphs)."""

    times: PhaseTimes
    alias_map: AliasMap
    report: PlanReport


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
        changed), checked after parallelization and again after init_weights; and, under
        pipeline parallelism, when the stages' copies of tied embeddings differ, checked
        after init and after every step."""

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
        (TORCHINDUCTOR_CACHE_DIR). On CPU, Inductor's check of the vector instructions is
        made in the machine's folder either way (once per machine)."""

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
        """Folder of the graph cache (torchtitan_ext/parallelize/graph_cache.py). A start
        whose model, mesh, batch, dtypes, constraints, compile settings, placement file and
        versions equal a cached start's rebuilds the parallel model from it and skips
        tracing, solving, applying and (compiled) Inductor. Relative paths are under
        dump_folder; empty: no cache."""

        dump_placements: bool = False
        """Write the solver's placements (placements.json, the placement_file format; and
        solution.txt, one line per graph node) to <dump_folder>/autoparallel/ on rank 0.
        The plan report is always written there as plan.json."""

    def __init__(self, config: Config):
        require_autoparallel()
        self.config = config
        self.last: Start | None = None
        """The last call's record (dry runs, tests and benchmarks read it)."""

    @property
    def times(self) -> PhaseTimes:
        return self.last.times

    @property
    def report(self) -> PlanReport:
        return self.last.report

    @property
    def alias_map(self) -> AliasMap:
        return self.last.alias_map

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
        config = self.config
        spec = PlanSpec.build(
            model,
            config=config,
            parallel_dims=parallel_dims,
            training=training,
            parallelism=parallelism,
            compile_config=compile_config,
            ac_config=ac_config,
            dump_folder=dump_folder,
        )
        if getattr(model, "enable_weight_tying", False) and spec.stage is not None:
            # torchtitan's init_states re-ties tok_embeddings to lm_head, and a stage lacks
            # one or both (the Trainer keeps the two stages' copies equal: tied_stages).
            assert not (spec.stage.first and spec.stage.last), spec.stage
            model.enable_weight_tying = False
        patches.reset_autoparallel_caches()
        times = PhaseTimes()
        aliases = AliasGuard(model, check=config.alias_check, times=times)
        reporter = PlanReporter(spec.dump, writes=spec.writes)

        def after_init(parallel_model: nn.Module) -> None:
            write_startup(spec.dump, times, parallel_model, writes=spec.writes)

        if spec.compile:
            prepare_inductor(
                dump_folder=dump_folder,
                cache_dir=config.compile_cache_dir,
                ac=spec.ac,
                device_type=spec.mesh.device_type,
            )
        if spec.expert_parallel:
            # Before the graph cache too: the rebuilt module has the traced one's MoE modules.
            enable_expert_parallel(model, mesh=spec.mesh, axes=tuple(spec.axes))
        cache = GraphCache.for_start(config=config, spec=spec, dump_folder=dump_folder)
        cached = cache.load(model, times) if cache is not None else None
        if cached is not None:
            parallel_model, report = cached
            aliases.restore(parallel_model, after_init=after_init)
            reporter.publish(report, source="from the graph cache")
            self.last = Start(times, aliases.alias_map, report)
            return parallel_model

        try:
            parallel_model, autop, captured = self._cold_start(
                model, spec, aliases, reporter, times, after_init, serializable=cache is not None
            )
        except patches.NotSerializable as e:
            # AOTAutograd refused to bundle the graphs; its failed attempt left
            # AutoParallel's state half-compiled, so plan again, without the cache.
            logger.warning(f"AutoParallel: {e}; planning again without the graph cache")
            cache = None
            parallel_model, autop, captured = self._cold_start(
                model, spec, aliases, reporter, times, after_init, serializable=False
            )
        if cache is not None:
            cache.save(captured, autop, parallel_model, report=reporter.report, times=times)
        self.last = Start(times, aliases.alias_map, reporter.report)
        return parallel_model

    def _cold_start(
        self,
        model: nn.Module,
        spec: PlanSpec,
        aliases: AliasGuard,
        reporter: PlanReporter,
        times: PhaseTimes,
        after_init,
        *,
        serializable: bool,
    ):
        """AutoParallel's trace, constraints, solve (or placement file) and apply, then the
        alias restore and the plan report. With ``serializable``, the graphs are compiled in
        the form the graph cache saves (captured["compiled"])."""
        from autoparallel.api import AutoParallel

        config = self.config
        captured: dict = {}
        compiling = (
            patches.serializable_compile(captured) if serializable else contextlib.nullcontext()
        )
        compiler = Compiler(
            inductor=spec.compile,
            ac=spec.ac,
            eager_overlap=config.eager_overlap,
            all_reduce_bucket_mb=config.all_reduce_bucket_mb,
            reporter=reporter,
        )
        # One rank of the mesh solves; the others receive its placements (placements.py).
        loads = bool(spec.placement_path) and os.path.exists(spec.placement_path)
        solves = spec.writes and not loads
        t0 = time.perf_counter()
        with (
            compiling,
            patches.strategies_only_optimizer(not solves),
            patches.memoized_redistribute_costs(),
            patches.memoized_optimizer_input_nodes(),
            patches.optimizer_outside_gc(),
            patches.memoized_sympy_factor(),
            AutoParallel(
                model,
                spec.input_fn,
                spec.mesh,
                mp_policy=spec.mp_policy,
                reshard_after_forward=spec.reshard_after_forward,
                # The tokens each rank's experts receive depend on the routing: traced with
                # unbacked sizes inside the expert region.
                dynamic=spec.expert_parallel,
            ) as autop,
        ):
            times.trace = time.perf_counter() - t0
            expert_gradients = None
            if spec.expert_parallel:
                expert_gradients = expert_gradient_placements(autop.gm)
                check_expert_gradients(
                    expert_gradients,
                    axes=spec.axes,
                    experts=sum(".inner_experts." in f for f in aliases.names["parameters"]),
                )
            low, high = spec.memory_bounds
            mesh = dict(zip(spec.axes, spec.mesh.shape, strict=True))
            logger.info(
                f"AutoParallel: planning on mesh {mesh}, global batch {spec.batch} x "
                f"{spec.key['inputs'][1]}, parameter memory per rank in [{low:.3g}, {high:.3g}] "
                "of the model"
            )
            if solves:
                constrain(
                    autop,
                    spec,
                    alias_map=aliases.alias_map,
                    parallel_matmuls=config.parallel_matmuls,
                )
            t0 = time.perf_counter()
            placement = solve_or_load(
                autop,
                loads=loads,
                path=spec.placement_path,
                key=spec.key,
                parameters=parameter_ranks(model),
                dump=spec.dump,
                dump_placements=config.dump_placements,
                writes=spec.writes,
            )
            times.solve = time.perf_counter() - t0
            parallel_model, times.apply = compiler.apply(
                autop, placement, serializable=serializable
            )
            times.compile = compiler.compile_s
        aliases.restore(parallel_model, after_init=after_init)
        report = build_report(
            mesh_axes=spec.axes,
            mesh_shape=tuple(spec.mesh.shape),
            joint_graph=autop.gm,
            planned=compiler.planned,
            executed=compiler.executed,
            parallel_model=parallel_model,
            expert_gradients=expert_gradients,
        )
        reporter.publish(
            report,
            source=f"trace {times.trace:.1f}s, solve {times.solve:.1f}s, apply {times.apply:.1f}s"
            + (f", compile {times.compile:.1f}s" if times.compile else ""),
        )
        return parallel_model, autop, captured
