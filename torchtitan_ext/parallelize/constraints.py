"""The solver's constraints: what every plan must satisfy beyond AutoParallel's cost model.

``constrain`` adds them all to a traced AutoParallel: input and logits placements, the
parameter memory bounds, one placement per alias group, Shard(0) for embeddings tied across
pipeline stages, replicated MoE router state, HSDP's replicated parameters, and
(parallel_matmuls) forward matmuls that compute only this rank's share. AutoParallel's
public add_node_constraint takes one placement for the whole mesh; ``_keep_strategies``
uses the optimizer's underlying constraint, which allows several.
"""

from __future__ import annotations

import functools

import torch
from torch.distributed.tensor.placement_types import Replicate, Shard

from torchtitan_ext.aliases import AliasMap
from torchtitan_ext.parallelize.spec import PlanSpec


def constrain(autop, spec: PlanSpec, *, alias_map: AliasMap, parallel_matmuls: bool) -> None:
    """Every constraint of a plan, added to AutoParallel's sharding optimizer."""
    low, high = spec.memory_bounds
    autop.add_input_constraints([spec.input_placement, spec.input_placement])
    autop.add_output_constraints([spec.logits_placement])
    autop.add_parameter_memory_constraint(low=low, high=high)
    constrain_alias_placements(autop, alias_map)
    _replicate_router_state(autop)
    if "dp_replicate" in spec.axes and len(spec.axes) > 1:
        _replicate_parameters(autop, axis=spec.axes.index("dp_replicate"))
    if spec.stage is not None and spec.stage.tied:
        _shard_tied_copy(autop, spec.stage.tied)
    if parallel_matmuls:
        _constrain_matmuls(autop, axes=spec.axes, batch=spec.batch)


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


def _shard_tied_copy(autop, fqn: str) -> None:
    """Place a stage's copy of embeddings tied across pipeline stages Shard(0) on every mesh
    axis, as the other stage's copy: the two ranks of a tie group then hold the same rows,
    and torchtitan_ext.tied_stages sums their gradients shard by shard."""
    from torch._functorch._aot_autograd.fx_utils import get_named_param_nodes

    opt = autop.sharding_optimizer
    _keep_strategies(
        opt,
        opt._normalize_node(get_named_param_nodes(opt.graph)[fqn]),
        lambda placements: all(p == Shard(0) for p in placements),
        name="shard_tied_copy",
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
    AutoParallel traces linear layers as aten.einsum with the weight as [in, out]."""
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


def _keep_strategies(opt, node, keep, *, name: str) -> None:
    """Constrain ``node`` to the strategies whose output placements (one per mesh axis)
    satisfy ``keep``."""
    indices = [
        i
        for i, strategy in enumerate(opt.strats[node].strategies)
        if keep(strategy.output_specs.placements)
    ]
    opt._add_node_constraint(node, output_constraint_indices=indices, constraint_name=name)
