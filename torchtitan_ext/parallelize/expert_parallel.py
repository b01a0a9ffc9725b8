"""Expert parallelism planned by AutoParallel on torchtitan's own MoE modules.

torchtitan's ``RoutedExperts`` (token dispatch, grouped experts, combine) works on local
tensors once its routing is known; which tokens reach which rank depends on the data, so no
DTensor placement describes it. AutoParallel's answer is a ``local_map`` region: the solver
plans everything around it (attention, router, shared experts, the dense layers) and treats
the region as one op with fixed input and output placements. Inside, tokens go to the ranks
holding their experts through AutoParallel's ``all_to_all`` (which carries the backward):

- in: tokens, routing scores and expert ids sharded on the batch over every data axis;
  expert weights ``Shard(0)`` (whole experts, 1/ep of them per rank) on the ``ep`` axis
  and replicated on the other data axes (dp_replicate, efsdp);
- out: the combined tokens, sharded as they came in;
- gradients: the tokens' sharded as the tokens; the expert weights' ``Partial`` on every
  data axis but ep (``EXPERT_GRAD_PARTIAL_AXES``). An ep group's ranks see only their
  own data shard's tokens, so each expert gradient is a partial sum over the other data
  axes, which the plan must reduce (``in_grad_placements``; without them local_map
  declares it replicated, i.e. complete, and the reduction is silently dropped:
  meta-pytorch/autoparallel#515).

``enable_expert_parallel`` turns every ``RoutedExperts`` of a model into this region before
AutoParallel traces it; it changes no parameter, buffer or name, so state_dicts and
checkpoints stay torchtitan's. The dispatcher is torchtitan's ``AllToAllTokenDispatcher``
with its exchanges through AutoParallel; its reorder, permute and combine are torchtitan's.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DeviceMesh, Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement
from torchtitan.models.common.moe import GroupedExperts, RoutedExperts
from torchtitan.models.common.token_dispatcher import (
    AllToAllDispatchMetadata,
    AllToAllTokenDispatcher,
    LocalTokenDispatcher,
)
from torchtitan.tools.logging import logger

from torchtitan_ext import patches
from torchtitan_ext.models import Float32GroupedExperts, grouped_experts

# The mesh axes tokens are sharded on (every data-parallel axis; tp replicates them).
EP_DATA_AXES = ("dp_replicate", "efsdp", "ep")
# The data axes an expert-weight gradient is a partial sum over: every one but ep, whose
# ranks exchange tokens so that each expert sees all of its ep group's tokens.
EXPERT_GRAD_PARTIAL_AXES = ("dp_replicate", "efsdp")


class LocalMapTokenDispatcher(AllToAllTokenDispatcher):
    """torchtitan's all-to-all token dispatcher inside a ``local_map`` region planned by
    AutoParallel: torchtitan's reorder, permute, unpermute and combine, with the count and
    token exchanges through AutoParallel's ``all_to_all`` on a named mesh axis.

    torchtitan's own dispatch asks its SPMD backend for the current mesh (thread-local
    state Dynamo cannot trace) and exchanges with functional collectives that have no
    backward once traced (its EP runs them eagerly, under its own autograd)."""

    @dataclass(kw_only=True, slots=True)
    class Config(AllToAllTokenDispatcher.Config):
        axis_name: str = "ep"

    def __init__(self, config: Config):
        super().__init__(config)
        self.axis_name = config.axis_name

    def init_buffer(self) -> None:
        pass

    def dispatch(self, x_TD, topk_scores_TK, topk_expert_ids_TK, num_local_tokens_per_expert_E):
        from autoparallel.collectives import all_to_all

        assert self.ep_mesh is not None, "wire_meshes() first"
        ep_size = self.ep_mesh.size()
        routed_input_ND, token_indices_N, topk_scores_N = self._local_reorder(
            x_TD, topk_scores_TK, topk_expert_ids_TK
        )
        with torch.no_grad():
            counts_EP_e = all_to_all(
                num_local_tokens_per_expert_E.view(ep_size, -1), None, None, self.axis_name
            )
            counts_E, input_splits, output_splits = self._sync_token_count_exchange(
                num_local_tokens_per_expert_E, counts_EP_e, ep_size
            )
        routed_input_RD = all_to_all(routed_input_ND, output_splits, input_splits, self.axis_name)
        input_shape, routed_input_RD, permuted_indices, counts_e = self._permute(
            routed_input_RD, counts_E
        )
        metadata = AllToAllDispatchMetadata(
            token_indices_experts_sorted_N=token_indices_N,
            topk_scores_experts_sorted_N=topk_scores_N,
            input_shape=input_shape,
            permuted_indices=permuted_indices,
            input_splits=input_splits,
            output_splits=output_splits,
        )
        return routed_input_RD, counts_e, metadata

    def combine(self, routed_output_RD, metadata, x_TD):
        from autoparallel.collectives import all_to_all

        routed_output_RD = self._unpermute(
            routed_output_RD, metadata.input_shape, metadata.permuted_indices
        )
        routed_output_ND = all_to_all(
            routed_output_RD, metadata.input_splits, metadata.output_splits, self.axis_name
        )
        # Score and scatter_add into the tokens, as without EP.
        return LocalTokenDispatcher.combine(self, routed_output_ND, metadata, x_TD)


class LocalMapRoutedExperts(RoutedExperts):
    """torchtitan's RoutedExperts run as one ``local_map`` region (see the module
    docstring). Made from a built RoutedExperts by ``enable_expert_parallel``: same
    parameters and names."""

    mesh: DeviceMesh
    axes: tuple[str, ...]
    compute_dtype: torch.dtype | None
    """The experts' matmul dtype: bf16 as torchtitan's GroupedExperts, None (the input's)
    for torchtitan_ext.models.Float32GroupedExperts."""

    @classmethod
    def convert(
        cls,
        module: RoutedExperts,
        *,
        mesh: DeviceMesh,
        axes: tuple[str, ...],
        compute_dtype: torch.dtype | None,
    ) -> None:
        """Make a built RoutedExperts this class, in place. A class swap, as FSDP2's
        fully_shard does: the module keeps its parameters, buffers, hooks and names; only
        forward changes, and the region's mesh and dtype are set here."""
        module.__class__ = cls
        module.mesh = mesh
        module.axes = axes
        module.compute_dtype = compute_dtype

    def forward(
        self,
        x_BLD: torch.Tensor,
        topk_scores_BLK: torch.Tensor,
        topk_expert_ids_BLK: torch.Tensor,
        num_local_tokens_per_expert_E: torch.Tensor,
    ) -> torch.Tensor:
        from autoparallel.collectives import local_map

        # The counts torchtitan passes are over the whole batch; the region counts its own
        # tokens. Tensors go in as arguments: local_map maps only those.
        del num_local_tokens_per_expert_E
        experts = self.inner_experts
        compute_dtype = self.compute_dtype
        dispatcher = self.token_dispatcher
        num_experts = experts.num_experts

        def region(x_BLD, topk_scores_BLK, topk_expert_ids_BLK, w1_EFD, w2_EDF, w3_EFD):
            B, L, D = x_BLD.shape
            K = topk_scores_BLK.size(-1)
            x_TD = x_BLD.reshape(B * L, D)
            ids_N = topk_expert_ids_BLK.reshape(-1)
            # Tokens per expert on this rank (torch.histc has no int64 kernel on CPU).
            counts_E = torch.zeros(num_experts, dtype=torch.int64, device=ids_N.device)
            counts_E = counts_E.scatter_add(0, ids_N, torch.ones_like(ids_N))
            routed_RD, counts_e, metadata = dispatcher.dispatch(
                x_TD, topk_scores_BLK.reshape(B * L, K), topk_expert_ids_BLK.reshape(B * L, K),
                counts_E,
            )  # fmt: skip
            routed_RD = grouped_experts(
                routed_RD, counts_e, w1_EFD, w2_EDF, w3_EFD, compute_dtype=compute_dtype
            )
            return dispatcher.combine(routed_RD, metadata, x_TD).view(B, L, D)

        tokens = tuple(Shard(0) if axis in EP_DATA_AXES else Replicate() for axis in self.axes)
        experts_placement = tuple(Shard(0) if axis == "ep" else Replicate() for axis in self.axes)
        experts_grad = tuple(
            Partial() if axis in EXPERT_GRAD_PARTIAL_AXES else placement
            for axis, placement in zip(self.axes, experts_placement, strict=True)
        )
        return local_map(
            region,
            out_placements=(tokens,),
            in_placements=(tokens, tokens, tokens, *(experts_placement,) * 3),
            in_grad_placements=(tokens, tokens, tokens, *(experts_grad,) * 3),
            redistribute_inputs=True,
            device_mesh=self.mesh,
        )(
            x_BLD, topk_scores_BLK, topk_expert_ids_BLK,
            experts.w1_EFD, experts.w2_EDF, experts.w3_EFD,
        )  # fmt: skip


def enable_expert_parallel(model: nn.Module, *, mesh: DeviceMesh, axes: tuple[str, ...]) -> int:
    """Make every RoutedExperts of ``model`` a LocalMapRoutedExperts on ``mesh`` (whose
    axes are ``axes``, one named "ep"), in place, before AutoParallel traces the model.
    Returns the number of MoE layers changed. ValueError for experts we cannot split, and
    for a model without MoE layers."""
    patches.adapt_local_map_hop()
    assert "ep" in axes, axes
    ep = mesh.size(axes.index("ep"))
    changed = 0
    for fqn, module in model.named_modules():
        if not isinstance(module, RoutedExperts):
            continue
        experts = module.inner_experts
        if type(experts) not in (GroupedExperts, Float32GroupedExperts):
            raise ValueError(
                f"{fqn}.inner_experts is a {type(experts).__qualname__}; expert parallelism "
                "through AutoParallel runs torchtitan's GroupedExperts (w1/w2/w3) only"
            )
        if experts.num_experts % ep:
            raise ValueError(
                f"{fqn}: {experts.num_experts} experts do not split over "
                f"--parallelism.expert_parallel_degree {ep}"
            )
        old = module.token_dispatcher
        module.token_dispatcher = LocalMapTokenDispatcher(
            LocalMapTokenDispatcher.Config(num_experts=old.num_experts, top_k=old.top_k)
        )
        module.token_dispatcher.wire_meshes(ep_mesh=mesh["ep"] if len(axes) > 1 else mesh)
        LocalMapRoutedExperts.convert(
            module,
            mesh=mesh,
            axes=axes,
            compute_dtype=None if type(experts) is Float32GroupedExperts else torch.bfloat16,
        )
        changed += 1
    if not changed:
        raise ValueError(
            f"--parallelism.expert_parallel_degree {ep}: {type(model).__qualname__} has no MoE "
            "layer (torchtitan's RoutedExperts)"
        )
    logger.info(
        f"AutoParallel: expert parallelism on {changed} MoE layer(s): experts sharded on "
        "ep, tokens exchanged with all_to_all in a local_map region"
    )
    return changed


def expert_gradient_placements(
    joint_graph: torch.fx.GraphModule,
) -> dict[str, tuple[Placement, ...]]:
    """Expert parameter FQN -> the placements its expert region declares for its gradient
    (one per mesh axis), read from the traced joint graph: the backward region's
    ``out_placements`` at the output the parameter's gradient comes from. What the solver
    plans reductions from; a data axis missing a Partial here is a reduction never done."""
    from torch._functorch._aot_autograd.descriptors import GradAOTOutput, ParamAOTInput

    output = joint_graph.graph.output_node()
    result = {}
    for value, desc in zip(output.args[0], output.meta["desc"], strict=True):
        if not (
            isinstance(desc, GradAOTOutput)
            and isinstance(desc.grad_of, ParamAOTInput)
            and ".inner_experts." in desc.grad_of.target
            and isinstance(value, torch.fx.Node)
        ):
            continue
        region, index = _region_output_of(value)
        if region is not None:
            placements = region.meta["local_map_kwargs"]["out_placements"][index]
            result[desc.grad_of.target] = tuple(placements)
    return result


def _region_output_of(node: torch.fx.Node) -> tuple[torch.fx.Node | None, int]:
    """The local_map region and output index ``node`` is computed from, through the
    getitem, view and cast nodes between them (the first region found going up)."""
    seen, todo = set(), [node]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if (
            node.target is operator.getitem
            and isinstance(node.args[0], torch.fx.Node)
            and "local_map_kwargs" in node.args[0].meta
        ):
            return node.args[0], node.args[1]
        if "local_map_kwargs" not in node.meta:
            todo.extend(node.all_input_nodes)
    return None, -1


def check_expert_gradients(
    declared: dict[str, tuple[Placement, ...]], *, axes: list[str], experts: int
) -> None:
    """RuntimeError, before the plan is applied, when an expert parameter's gradient is not
    declared a partial sum on every mesh axis but ep: with expert parallelism every axis
    is a data axis (tokens split over it) and only ep splits the experts, so on every
    other axis each rank's expert gradient covers its own tokens only, and a gradient not
    declared partial there is never summed. ``experts``: how many expert parameters the
    model has (each must be found)."""
    required = [axis for axis in axes if axis != "ep"]
    problems = [
        f"{fqn} ({', '.join(f'{a}={p}' for a, p in zip(axes, placements, strict=True))})"
        for fqn, placements in sorted(declared.items())
        if any(not placements[axes.index(axis)].is_partial() for axis in required)
    ]
    if len(declared) != experts:
        problems.append(f"{experts - len(declared)} expert parameter(s) not found in the graph")
    if problems:
        raise RuntimeError(
            f"AutoParallel: refusing a plan that drops expert gradient reductions over "
            f"{', '.join(required)} (each rank group would train its experts on its own "
            f"tokens alone): {'; '.join(problems)}"
        )


def expert_gradient_reductions(
    declared: dict[str, tuple[Placement, ...]],
    parameters: dict[str, tuple[Placement, ...]],
    *,
    axes: list[str],
) -> dict[str, str]:
    """Expert parameter FQN -> how the plan reduces its gradient, e.g. "reduce_scatter over
    efsdp": from each axis where the region declares a partial sum to the parameter's own
    placement there (sharded: reduce_scatter; replicated: all_reduce); "none" when no axis
    is partial (1 rank group per expert)."""
    result = {}
    for fqn, grad in declared.items():
        steps = [
            f"{'reduce_scatter' if final.is_shard() else 'all_reduce'} over {axis}"
            for axis, placement, final in zip(axes, grad, parameters[fqn], strict=True)
            if placement.is_partial()
        ]
        result[fqn] = ", ".join(steps) or "none"
    return result
