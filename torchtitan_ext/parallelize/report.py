"""The reports of a start: the plan report (plan.json: what AutoParallel's solution does on
each rank, read from its graphs) and the start-up report (startup.json: seconds per phase).

Counted from the graphs the parallel module executes each step (AutoParallel's forward and
backward graphs, after the partitioner placed re-gathers in the backward), not from the
solver's joint graph, so the collective counts are the executed ones. The report is derived
from graphs and parameters only, so a run that loads a placement file reports the same.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torchtitan.tools.logging import logger

from torchtitan_ext.aliases import storage_bytes, unique_storage_bytes
from torchtitan_ext.dump_folder import write_whole
from torchtitan_ext.parallelize.expert_parallel import expert_gradient_reductions

# Op name -> kind, for the _c10d_functional ops and Inductor's bucketed versions of them.
_COLLECTIVES = {
    "all_gather_into_tensor": "all_gather",
    "all_gather_into_tensor_out": "all_gather",
    "all_gather_into_tensor_coalesced": "all_gather",
    "_pre_bucket_all_gather": "all_gather",
    "_pre_bucket_reduce_scatter": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "all_reduce": "all_reduce",
    "all_reduce_coalesced": "all_reduce",
    "all_to_all_single": "all_to_all",
}
_MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.einsum.default)


@dataclass
class CollectiveStats:
    count: int = 0
    bytes: int = 0


@dataclass
class PlanReport:
    mesh: dict[str, int]
    """Mesh axis name -> size."""
    collectives: dict[str, CollectiveStats] = field(default_factory=dict)
    """Collective kind -> count and bytes (output size; all_to_all: what this rank sends
    when the routing sets what it receives) per training step, on one rank."""
    planned: dict[str, CollectiveStats] = field(default_factory=dict)
    """The same, in the graphs AutoParallel built: one collective per parameter and
    redistribution, before any bucketing."""
    bucketed: bool = False
    """Whether ``collectives`` were read after bucketing (eager_overlap, or compiled)."""
    compiled: bool = False
    """Whether ``collectives`` were read from Inductor's graphs after its bucketing."""
    parameters: dict[str, list[str]] = field(default_factory=dict)
    """Placement (one entry per mesh axis, e.g. "dp_shard=S(0)") -> parameter FQNs."""
    forward_flop_share: float | None = None
    """This rank's forward matmul FLOPs over the whole model's (1/dp for data parallel),
    over the matmuls whose sizes are known when tracing; None if none are."""
    matmul_batch_share: tuple[float, float] | None = None
    """Min and max, over those forward matmuls, of this rank's rows over the global rows."""
    experts: tuple[int, int] | None = None
    """MoE models: (experts each rank holds, experts per layer)."""
    expert_gradients: dict[str, str] = field(default_factory=dict)
    """Expert parallelism: expert parameter FQN -> how its gradient is reduced, e.g.
    "reduce_scatter over efsdp" (expert_parallel.expert_gradient_reductions)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def lines(self) -> list[str]:
        def text(stats: dict[str, CollectiveStats]) -> str:
            return (
                ", ".join(
                    f"{s.count} {kind} ({s.bytes / 2**20:.1f} MiB)"
                    for kind, s in sorted(stats.items())
                )
                or "none"
            )

        parameters = "; ".join(f"{len(v)} {k}" for k, v in sorted(self.parameters.items()))
        if self.forward_flop_share is None or self.matmul_batch_share is None:
            compute = "forward matmul FLOPs on this rank: unknown (no matmul of known size)"
        else:
            low, high = self.matmul_batch_share
            compute = (
                f"forward matmul FLOPs on this rank: {self.forward_flop_share:.3f} of the "
                f"model; rows per matmul: {low:.3f}-{high:.3f} of the global batch"
            )
        executed = "compiled" if self.compiled else "eager"
        if self.bucketed:
            executed += ", after bucketing"
        lines = [
            f"mesh {self.mesh}",
            f"collectives per step ({executed}): {text(self.collectives)}",
            f"parameters: {parameters}",
            compute,
        ]
        if self.bucketed:
            lines.insert(2, f"collectives planned (before bucketing): {text(self.planned)}")
        if self.experts is not None:
            lines.append(f"experts per rank: {self.experts[0]} of {self.experts[1]} per layer")
        if self.expert_gradients:
            total = len(self.expert_gradients)
            counts = Counter(self.expert_gradients.values())
            lines.append(
                "expert gradients: "
                + "; ".join(f"{how}: {n} of {total}" for how, n in sorted(counts.items()))
            )
        return lines


def collectives(graphs: list[torch.fx.GraphModule]) -> dict[str, CollectiveStats]:
    """Collective kinds in ``graphs`` with their count and output bytes. Subgraphs count too:
    Inductor's overlap scheduler moves nodes into control_deps subgraphs."""
    stats: dict[str, CollectiveStats] = {}
    for graph in graphs:
        for module in graph.modules():
            if not isinstance(module, torch.fx.GraphModule):
                continue
            for node in module.graph.nodes:
                if not isinstance(node.target, torch._ops.OpOverload):
                    continue
                if node.target.namespace not in ("_c10d_functional", "bucketing"):
                    continue
                kind = _COLLECTIVES.get(node.target._opname)
                if kind is None:
                    continue
                entry = stats.setdefault(kind, CollectiveStats())
                entry.count += 1
                size = _static_bytes(node.meta.get("val"))
                if size is None and kind == "all_to_all":
                    # An expert all_to_all receives as many rows as the routing sends it, a
                    # size known only at run time; count what this rank sends.
                    size = _static_bytes(node.args[0].meta.get("val"))
                entry.bytes += size or 0
    return stats


def _static_bytes(values) -> int | None:
    """Bytes of the tensors in ``values``; None when a size is known only at run time."""
    values = values if isinstance(values, (list, tuple)) else [values]
    total = sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))
    return total if isinstance(total, int) else None


def _forward_matmuls(graph: torch.fx.GraphModule) -> list[tuple[int, int]]:
    """(rows, flops) of each forward matmul whose shape is known when tracing, in program
    order."""
    result = []
    for node in graph.graph.nodes:
        if node.op != "call_function" or node.target not in _MATMULS:
            continue
        if node.meta.get("partitioner_tag") == "is_backward":
            continue
        out = node.meta["val"]
        if node.target == torch.ops.aten.einsum.default:
            a, b = (arg.meta["val"] for arg in node.args[1])
            contracted = a.shape[-1]
            rows = math.prod(out.shape[:-1])
        else:
            a = node.args[0].meta["val"]
            contracted = a.shape[-1]
            rows = math.prod(out.shape[:-1])
        # A dynamic trace (expert parallelism) has symbolic sizes: their example values
        # count. Matmuls on routed tokens have run-time row counts (no example): left out.
        rows, flops = _size_hint(rows), _size_hint(2 * out.numel() * contracted)
        if rows is not None and flops is not None:
            result.append((rows, flops))
    return result


def _size_hint(size) -> int | None:
    """An int size, a backed symbolic size's example value, or None (unbacked)."""
    if isinstance(size, torch.SymInt):
        return size.node.hint
    return size if isinstance(size, int) else None


def build_report(
    *,
    mesh_axes: list[str],
    mesh_shape: tuple[int, ...],
    joint_graph: torch.fx.GraphModule,
    planned: dict[str, torch.fx.GraphModule],
    executed: dict[str, torch.fx.GraphModule],
    parallel_model: nn.Module,
    expert_gradients: dict[str, tuple] | None = None,
) -> PlanReport:
    """Report the plan from the solver's joint graph (global shapes), the forward and backward
    graphs AutoParallel built and the ones each step runs (``planned`` and ``executed``,
    this rank's shapes, keyed "forward" and "backward") and the parameters.
    ``expert_gradients``: expert parameter FQN -> the gradient placements its expert region
    declares (expert_parallel.expert_gradient_placements)."""
    forward_graph = planned["forward"]
    report = PlanReport(mesh=dict(zip(mesh_axes, mesh_shape, strict=True)))
    report.planned = collectives([planned["forward"], planned["backward"]])
    report.collectives = collectives([executed["forward"], executed["backward"]])
    report.bucketed = executed != planned
    for fqn, param in parallel_model.named_parameters():
        if isinstance(param, DTensor):
            key = ", ".join(f"{a}={p}" for a, p in zip(mesh_axes, param.placements, strict=True))
        else:
            key = "local"
        report.parameters.setdefault(key, []).append(fqn)
    experts = [
        (
            param.to_local().shape[0] if isinstance(param, DTensor) else param.shape[0],
            param.shape[0],
        )
        for fqn, param in parallel_model.named_parameters()
        if fqn.endswith("inner_experts.w1_EFD")
    ]
    if experts:
        report.experts = experts[0]
    if expert_gradients:
        placements = {
            fqn: tuple(param.placements)
            for fqn, param in parallel_model.named_parameters()
            if isinstance(param, DTensor)
        }
        report.expert_gradients = expert_gradient_reductions(
            expert_gradients, placements, axes=mesh_axes
        )
    global_mm = _forward_matmuls(joint_graph)
    local_mm = _forward_matmuls(forward_graph)
    if global_mm and len(global_mm) == len(local_mm):
        report.forward_flop_share = sum(f for _, f in local_mm) / sum(f for _, f in global_mm)
        shares = [lr / gr for (lr, _), (gr, _) in zip(local_mm, global_mm, strict=True)]
        report.matmul_batch_share = (min(shares), max(shares))
    return report


@dataclass(slots=True)
class PhaseTimes:
    """Seconds spent in each start-up phase of one parallelization."""

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


class PlanReporter:
    """Logs one start's plan report and writes it (``writes``: this rank writes the start's
    files) to <dump>/plan.json; once
    Inductor compiled both training graphs, completes it with their bucketed collectives."""

    def __init__(self, dump: str, *, writes: bool):
        self.dump = dump
        self.writes = writes
        self.report: PlanReport | None = None
        self._compiled: tuple[list[torch.fx.GraphModule], float] | None = None
        """Inductor's scheduled graphs and seconds, until the report is published."""

    def publish(self, report: PlanReport, *, source: str) -> None:
        self.report = report
        logger.info(f"AutoParallel: {source}. Plan:\n  " + "\n  ".join(report.lines()))
        self._write()
        if self._compiled is not None:
            graphs, compile_s = self._compiled
            self.compiled(graphs, compile_s=compile_s)

    def compiled(self, graphs: list[torch.fx.GraphModule], *, compile_s: float) -> None:
        """Inductor's forward and backward after bucketing (in place), and its seconds."""
        if self.report is None:
            self._compiled = (graphs, compile_s)
            return
        self._compiled = None
        if self.report.compiled:
            return
        self.report.collectives = collectives(graphs)
        self.report.compiled = self.report.bucketed = True
        logger.info(
            f"AutoParallel: compiled plan (Inductor took {compile_s:.1f}s):\n  "
            + "\n  ".join(self.report.lines())
        )
        self._write()

    def _write(self) -> None:
        if self.writes:
            os.makedirs(self.dump, exist_ok=True)
            write_whole(os.path.join(self.dump, "plan.json"), self.report.to_json())


def write_startup(dump: str, times: PhaseTimes, module: nn.Module, *, writes: bool) -> None:
    """startup.json (where this rank ``writes``): the seconds of each phase and the parallel
    model's storage. Each alias name shares its group's storage: all names cost what the
    deduplicated objects cost (alias_extra_bytes 0)."""
    if not writes:
        return
    everything = unique_storage_bytes(module)
    objects = storage_bytes([*module.parameters(), *module.buffers()])
    startup = {
        "seconds": dataclasses.asdict(times),
        "unique_storage_bytes": everything,
        "alias_extra_bytes": everything - objects,
    }
    os.makedirs(dump, exist_ok=True)
    write_whole(os.path.join(dump, "startup.json"), json.dumps(startup, indent=2))
