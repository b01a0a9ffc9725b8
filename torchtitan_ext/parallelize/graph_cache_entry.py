"""A graph cache entry: what a cold start built that a warm start needs instead of trace,
solve and apply (one rank's), how a cold start makes it, and how a warm start rebuilds the
parallel module from it.

The graphs are kept in AOTAutograd's bundled, serializable form (patches.serializable_compile):
our eager runner's graphs (``eager_output_code``) or Inductor's output code, whose C++
kernels load from Inductor's cache folder.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate


@dataclass
class TensorSpec:
    """A parameter or buffer of the parallel module: global shape, dtype, placements."""

    fqn: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    placements: tuple
    requires_grad: bool


@dataclass
class CacheEntry:
    """What a warm start needs instead of trace, solve and apply (one rank's)."""

    key: dict
    compiled: bytes
    """AOTAutograd's bundled forward + backward (BundledAOTAutogradSerializableCallable):
    our eager runner's graphs, or Inductor's compiled code."""
    parameters: list[TensorSpec]
    """In the order the compiled graphs take them (AutoParallel's params_spec)."""
    buffers: list[TensorSpec]
    in_spec: object
    """pytree spec of the traced (args, kwargs), to order a call's keyword arguments."""
    out_spec: object
    input_shapes: list[tuple[int, ...]]
    """Local shapes of the flat model inputs on this rank."""
    report: object
    """The PlanReport of the cold start."""


def eager_output_code(runner: torch.fx.GraphModule):
    """Our eager runner as the OutputCode AOTAutograd's serializer takes: Inductor's
    RegionalOutputCode, which pickles a GraphModule (with GraphPickler). Its default op
    filter refuses the _c10d_functional collectives, which our graphs are made of; and
    no node metadata is kept: the runner's generated code needs none, and some of it
    (Inductor's bucketing passes leave fake-tensor state there) does not pickle."""
    from torch._inductor.output_code import RegionalOutputCode

    return RegionalOutputCode(runner, ops_filter=None, node_metadata_key_filter=_no_metadata)


# Module level, not a lambda: RegionalOutputCode pickles its filters with the graph.
def _no_metadata(key: str) -> bool:
    return False


def make_entry(
    *, key: dict, captured: dict, autop, parallel_model: nn.Module, input_placement, report
) -> CacheEntry:
    """The entry of a cold start, from AutoParallel's state after apply_placement;
    ``input_placement``: the placements (one per mesh axis) the inputs were planned with."""
    from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable
    from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw

    jd = autop.joint_with_descriptors

    def spec(fqn: str, tensor: DTensor) -> TensorSpec:
        return TensorSpec(fqn, tuple(tensor.shape), tensor.dtype, tuple(tensor.placements),
                          tensor.requires_grad)  # fmt: skip

    traced = autop._traced_inputs
    flat_inputs, in_spec = torch.utils._pytree.tree_flatten((tuple(traced.args), traced.kwargs))
    input_shapes = []
    for value in flat_inputs:
        # The inputs of an expert-parallel trace have symbolic (backed) sizes.
        shape = [guarding_hint_or_throw(d) for d in value.shape]
        for axis, placement in enumerate(input_placement):
            if placement.is_shard():
                shape[placement.dim] //= autop.mesh.size(axis)
        input_shapes.append(tuple(shape))
    return CacheEntry(
        key=key,
        compiled=BundledAOTAutogradSerializableCallable.serialize_compile_artifacts(
            captured["compiled"]
        ),
        parameters=[spec(f, parallel_model.get_parameter(f)) for f in jd.params_spec],
        buffers=[spec(f, parallel_model.get_buffer(f)) for f in jd.buffers_spec],
        in_spec=in_spec,
        out_spec=jd.out_spec,
        input_shapes=input_shapes,
        report=report,
    )


def build_parallel_module(model: nn.Module, entry: CacheEntry, mesh) -> nn.Module:
    """The parallel module of a cold start, rebuilt from ``entry``: the same class, FQNs,
    meta DTensor parameters and buffers with the same placements, and a forward that runs
    the cached graphs as AutoParallel's forward runs its own. Issues no collective (the
    caller creates the flattened mesh's group once every rank has a module)."""
    from autoparallel.module_construction import make_parallel_module
    from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable
    from torch.export._tree_utils import reorder_kwargs

    compiled = BundledAOTAutogradSerializableCallable.deserialize_compile_artifacts(entry.compiled)

    def sharded(spec: TensorSpec) -> DTensor:
        # As AutoParallel shards a parameter: replicated meta tensor, redistributed.
        empty = torch.empty(spec.shape, dtype=spec.dtype, device="meta")
        replicated = DTensor.from_local(empty, mesh, (Replicate(),) * mesh.ndim)
        return replicated.redistribute(mesh, spec.placements)

    parameters = {s.fqn: nn.Parameter(sharded(s), requires_grad=s.requires_grad)
                  for s in entry.parameters}  # fmt: skip
    buffers = {s.fqn: sharded(s) for s in entry.buffers}
    param_fqns = [s.fqn for s in entry.parameters]
    buffer_fqns = [s.fqn for s in entry.buffers]
    in_spec, out_spec, input_shapes = entry.in_spec, entry.out_spec, entry.input_shapes

    def forward(self, *args, **kwargs):
        if kwargs:
            kwargs = reorder_kwargs(kwargs, in_spec)
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        shapes = [tuple(x.shape) for x in inputs]
        if shapes != input_shapes:
            raise ValueError(
                f"the parallel model (from the graph cache) takes inputs of local shapes "
                f"{input_shapes}, got {shapes}"
            )
        # Looked up at each call, as AutoParallel's forward does: the Trainer's to_empty()
        # and checkpoint loads replace the tensors.
        flat = [self.get_parameter(f).to_local() for f in param_fqns]
        flat += [self.get_buffer(f).to_local() for f in buffer_fqns]
        outputs = compiled(*flat, *inputs)  # the deserialized callable boxes them itself
        return torch.utils._pytree.tree_unflatten(outputs, out_spec)

    # A copy keeps the original meta model untouched: make_parallel_module copies each
    # submodule's __dict__ shallowly, so registering names would write into the original.
    return make_parallel_module(copy.deepcopy(model), parameters, buffers, forward_fn=forward)
