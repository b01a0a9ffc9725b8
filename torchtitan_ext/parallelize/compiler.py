"""Apply and compile: the compilers AutoParallel's apply_placement calls for the forward and
backward graphs it builds.

Eager (the default), each graph runs as its own generated code after Inductor's overlap
scheduler bucketed its collectives and moved them to overlap compute (``eager_runner``).
With --compile.enable, Inductor compiles it with the passes AutoParallel's compile backend
runs (``Compiler._inductor_compile``). The Compiler keeps the graphs as planned and as
executed for the plan report, and the seconds Inductor took; once Inductor has scheduled
both training graphs it hands them to the report (``PlanReporter.compiled``).
"""

from __future__ import annotations

import copy
import functools
import os
import time

import torch
from torch import nn
from torchtitan.tools.logging import logger

from torchtitan_ext import patches
from torchtitan_ext.parallelize.graph_cache_entry import eager_output_code
from torchtitan_ext.parallelize.report import PlanReporter


def prepare_inductor(*, dump_folder: str, cache_dir: str, ac: bool, device_type: str) -> None:
    """Before a compiled start (graph cache or cold): Inductor's cache folder (its C++
    kernels and its FX graph cache) under the dump folder, its check of the CPU in the
    machine's folder (on CPU), and _grouped_mm's input strides.
    On a graph cache miss, Inductor's FX graph cache serves only expert-parallel graphs (the
    others are traced without a ShapeEnv: "No shape env")."""
    patches.grouped_mm_inputs_keep_eager_strides()
    if cache_dir:
        if device_type == "cpu":
            # Inductor checks which vector instructions this CPU and compiler support by
            # building test programs in its cache folder, once per process (a large share
            # of a small compile: benchmarks/README.md): a fact of the machine, so checked
            # in the machine's folder (TORCHINDUCTOR_CACHE_DIR or Inductor's default),
            # which keeps the builds for later starts, not in this run's.
            from torch._inductor.cpu_vec_isa import pick_vec_isa

            pick_vec_isa()
        # Inductor reads this at each lookup; the graph cache's compiled graphs load
        # their C++ kernels from it.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(
            os.path.join(dump_folder, cache_dir)
        )
        logger.info(f"AutoParallel: compile caches in {os.environ['TORCHINDUCTOR_CACHE_DIR']}")
    logger.info(
        "AutoParallel: Inductor compiles the forward and backward AutoParallel builds "
        f"(bucketing and overlap scheduling on, AC pass {'on' if ac else 'off'})"
    )


class Compiler:
    """AutoParallel's compiler_fn for one cold start, and what it compiled."""

    def __init__(
        self,
        *,
        inductor: bool,
        ac: bool,
        eager_overlap: bool,
        all_reduce_bucket_mb: float,
        reporter: PlanReporter,
    ):
        self.inductor = inductor
        self.ac = ac
        self.eager_overlap = eager_overlap
        self.all_reduce_bucket_mb = all_reduce_bucket_mb
        self.reporter = reporter
        self.planned: dict[str, torch.fx.GraphModule] = {}
        """"forward" and "backward" as AutoParallel built them (Inductor: a copy)."""
        self.executed: dict[str, torch.fx.GraphModule] = {}
        """The graphs each step runs (eager: bucketed); compiled: until Inductor's are known."""
        self.compile_s = 0.0
        """Seconds Inductor took, so far (the backward may compile at the first backward)."""
        self._scheduled: list[torch.fx.GraphModule] = []

    def apply(self, autop, placement, *, serializable: bool) -> tuple[nn.Module, float]:
        """AutoParallel's apply_placement with these compilers: the parallel module and the
        seconds apply took without Inductor's. ``serializable``: in the form the graph
        cache saves (patches.serializable_compile)."""
        autop.compiler_fn = functools.partial(self._compile_graph, serializable=serializable)
        # AutoParallel's activation-checkpointing pass tags the joint graph before
        # AOTAutograd partitions it (what autoparallel_backend does for Dynamo's graph).
        joint_pass = _ac_joint_pass if self.inductor and self.ac else None
        t0 = time.perf_counter()
        with torch._functorch.config.patch(joint_custom_pass=joint_pass):
            parallel_model = autop.apply_placement(placement)
        return parallel_model, time.perf_counter() - t0 - self.compile_s

    def _compile_graph(self, gm, example_inputs, tag_forward=False, *, serializable: bool):
        # Provenance ("from_node": each node's history of passes, for Inductor's provenance
        # tracking, off by default) is dropped: Inductor's bucketing gives every node it
        # creates a deep copy of the history of every node in its bucket (torch 2.14,
        # bucketing._populate_node_meta), quadratic in the layer count.
        for node in gm.graph.nodes:
            node.meta.pop("from_node", None)
        # The training forward, its backward (inputs: tangents), the inference forward.
        tangents = any(
            n.op == "placeholder" and n.name.startswith("tangents") for n in gm.graph.nodes
        )
        key = "forward" if tag_forward else "backward" if tangents else "inference"
        if key == "inference":
            # Used by validation alone: its runner (the overlap scheduler, ~1 s) is built at
            # its first call; eager also when compiled (no compile for it).
            runner = None

            def run_inference(args):
                nonlocal runner
                if runner is None:
                    runner = self.eager_runner(gm)
                return runner(args)

            run_inference._boxed_call = True
            return run_inference
        if self.inductor:
            # Inductor's passes rewrite gm in place: the report's planned graph is a copy.
            self.planned[key] = self.executed[key] = torch.fx.GraphModule(
                gm, copy.deepcopy(gm.graph)
            )
            return self._inductor_compile(gm, example_inputs, backward=key == "backward")
        runner = self.eager_runner(gm)
        self.planned[key] = gm
        self.executed[key] = runner if self.eager_overlap else gm
        # The graph cache saves AOTAutograd's serializable form, which takes OutputCode.
        return eager_output_code(runner) if serializable else runner

    def _inductor_compile(self, gm: torch.fx.GraphModule, example_inputs, *, backward: bool):
        """Inductor's code for one of AutoParallel's graphs, with the passes AutoParallel's
        compile backend (autoparallel_backend) runs: collective bucketing, comm/compute
        overlap scheduling and, with all_reduce_bucket_mb, all-reduce bucketing.

        AutoParallel a54c252 expects torch.compile over its module: Dynamo traces the
        module again and AOTAutograd makes a second joint graph at every start, and its
        partitioner replays the first one's choices. We compile the graphs AutoParallel
        already partitioned, as its API did before a54c252 (compile_fx_inner as the
        compiler): no retrace at step 1, and the result is AOTAutograd's serializable form,
        which the graph cache keeps. Called at apply (the backward at the first backward
        without the graph cache: the patches are entered here, not around apply)."""
        from autoparallel.api import _suppress_wait_tensor_side_effect
        from autoparallel.compile import _INDUCTOR_OVERLAP_PATCHES
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx_inner

        options = dict(_INDUCTOR_OVERLAP_PATCHES)
        if self.all_reduce_bucket_mb > 0:
            # The overlap scheduler buckets FSDP's all-gathers and reduce-scatters but leaves
            # every gradient all-reduce on its own; Inductor's all-reduce bucketing pass is
            # off by default. torch 2.14's greedy bucketing reads the cap of bucket 0 for
            # every bucket. A module-level partial keeps the config picklable (Inductor
            # pickles its config for cache keys).
            options["bucket_all_reduces_fx"] = "all"
            options["bucket_all_reduces_fx_bucket_size_determinator"] = functools.partial(
                _bucket_cap_mb, self.all_reduce_bucket_mb
            )
        t0 = time.perf_counter()
        with (
            patches.recording_overlap_schedule(self._scheduled.append),
            _suppress_wait_tensor_side_effect(),
            inductor_config.patch(options),
        ):
            compiled = compile_fx_inner(gm, example_inputs, is_backward=backward)
        self.compile_s += time.perf_counter() - t0
        if len(self._scheduled) == 2:
            self.reporter.compiled(self._scheduled, compile_s=self.compile_s)
        return compiled

    def eager_runner(self, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        """The eager form of one of AutoParallel's graphs, a boxed callable.

        AutoParallel runs its eager graphs through torch.fx.Interpreter, Python work per node
        on every step, and issues one collective per parameter. We run the graph's own
        generated code instead (the same ops in the same order; the boxed calling convention
        frees each input after its last use, as the Interpreter does), after Inductor's
        overlap scheduler bucketed its collectives and moved them to overlap compute
        (benchmarks/README.md compares the three).
        """
        from autoparallel.compile import _INDUCTOR_OVERLAP_PATCHES
        from torch._inductor import config as inductor_config
        from torch._inductor.fx_passes.bucketing import bucket_all_reduce
        from torch._inductor.fx_passes.overlap_scheduling import (
            schedule_overlap_bucketing_from_inductor_configs,
        )

        runner = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
        if self.eager_overlap:
            with inductor_config.patch(
                {
                    # The settings autoparallel_backend() compiles with, less what only
                    # Inductor uses: dependencies for its scheduler, fused regions it codegens.
                    **_INDUCTOR_OVERLAP_PATCHES,
                    "aten_distributed_optimizations.insert_overlap_deps": False,
                    "aten_distributed_optimizations.enable_fusion_regions": False,
                    # The scheduler's ordering hints can form a cycle (torch 2.14; the DDP-like
                    # plan's backward: "detected 2 cyclic extra dep(s)", then RuntimeError).
                    # Autofix drops those hints; the graph's own dependencies still order
                    # every node.
                    "aten_distributed_optimizations.overlap_scheduling_autofix_cycles": True,
                }
            ):
                schedule_overlap_bucketing_from_inductor_configs(runner)
            if self.all_reduce_bucket_mb > 0:
                bucket_all_reduce(
                    runner, functools.partial(_bucket_cap_mb, self.all_reduce_bucket_mb)
                )
        runner.graph.set_codegen(torch.fx.graph._BoxedCodeGen())
        runner.recompile()
        assert runner._boxed_call  # AOTAutograd calls it with one list of inputs
        return runner


def _ac_joint_pass(graph_module: torch.fx.GraphModule, joint_inputs) -> torch.fx.GraphModule:
    """AutoParallel's activation-checkpointing pass, as AOTAutograd's joint_custom_pass
    (the signature it calls; "auto": stages of sqrt(recomputable memory))."""
    from autoparallel.graph_passes.activation_checkpointing import ac_joint_pass

    ac_joint_pass(graph_module.graph, "auto")
    return graph_module


def _bucket_cap_mb(cap_mb: float, bucket: int) -> float:
    return cap_mb
